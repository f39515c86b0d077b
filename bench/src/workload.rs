//! Request-length workloads: named prompt/output length distributions, fixed and uniform shapes,
//! JSONL traces, and the two prefix-sharing workloads. This module owns parsing a workload spec
//! (`sharegpt`, `fixed:P,O`, `uniform:PMIN-PMAX,OMIN-OMAX`, `trace.jsonl`, `trace:PATH`,
//! `prefix-repetition:NUM_PREFIXES,PREFIX_LEN,SUFFIX_LEN,OUTPUT_LEN`,
//! `multi-turn:CONVERSATIONS,TURNS,USER_LEN,OUTPUT_LEN[,THINK_SECONDS]`), reading traces, and
//! drawing a seeded, reproducible list of [`RequestShape`]s from any of them. It is used by the
//! KV-memory fragmentation study (`vkv frag`) and by benchmarks; it knows nothing about tokens
//! themselves: the token ids of the prefix-sharing workloads (which prompts share what) are
//! [`crate::prefix`]'s, and only `vkv bench offline` and `vkv bench serve` run them as such.
//!
//! - `prefix-repetition` (vLLM bench's `prefix_repetition` dataset): `NUM_PREFIXES` random
//!   prefixes of `PREFIX_LEN` tokens; request *i* is prefix *i* mod `NUM_PREFIXES` (round-robin)
//!   followed by its own random suffix of `SUFFIX_LEN` tokens, and generates `OUTPUT_LEN` tokens.
//!   As shapes: every request is `PREFIX_LEN + SUFFIX_LEN` prompt and `OUTPUT_LEN` output tokens.
//! - `multi-turn`: `CONVERSATIONS` chats of `TURNS` turns each; a turn's prompt is the whole
//!   conversation so far (every earlier user message and reply) plus a new user message of
//!   `USER_LEN` tokens, and the next turn is sent `THINK_SECONDS` (default 0) after the reply
//!   ends. It has `CONVERSATIONS × TURNS` requests whatever `--num-prompts` says. As shapes
//!   (for `vkv frag`), turn *k* (from 0) is `(k + 1) × USER_LEN + k × OUTPUT_LEN` prompt tokens,
//!   replies taken as `OUTPUT_LEN` tokens, cycling over the turns of one conversation.
//!
//! Where each named distribution comes from. In every case the *shape* of the distribution
//! (log-normal or uniform, and any sigma not stated below as derived) is our assumption; only the
//! quoted summary statistics come from the cited work. Prompt and output lengths are drawn
//! independently (also an assumption: real datasets correlate them somewhat), rounded to the
//! nearest integer and clamped to at least 1 token.
//!
//! - `sharegpt`: mean prompt 161.31 and mean output 337.99 tokens, from the vLLM paper (Kwon et
//!   al., SOSP 2023, §6.1 / Fig. 11: ShareGPT has 8.4× longer inputs and 5.8× longer outputs than
//!   Alpaca, in their tokenization). Assumed: log-normal with sigma 1.0 for both, mu chosen so the
//!   *mean* matches (`mean = exp(mu + sigma²/2)`).
//! - `alpaca`: mean prompt 19.31 and mean output 58.45 tokens, from the same paper and figure.
//!   Assumed: log-normal with sigma 0.6 for both, mean-matched as above.
//! - `arxiv-summarization`: prompt median ≈ 2.7k and p90 ≈ 3.7k tokens, output median ≈ 170
//!   tokens: the figures our issue tracker quotes for the arXiv-summarization workload of the
//!   long-prompt evaluations in vAttention (Prabhu et al.) and Sarathi-Serve (Agrawal et al., OSDI
//!   2024); they have not been re-checked against those papers here. Assumed: log-normal prompt with median 2700
//!   and sigma `ln(3700/2700) / 1.2816` (derived so that the p90 is 3700, 1.2816 being the
//!   standard normal's 90th percentile); log-normal output with median 170 and sigma 0.5 (the
//!   sigma is our assumption).
//! - `longbench`: prompts of roughly 1.9k–2k tokens (LongBench-style long-context inputs as
//!   truncated in serving evaluations). Assumed: prompt uniform over the integers 1900..=2000;
//!   output log-normal with median 64 and sigma 0.5 (LongBench tasks mostly have short answers).
//! - `humaneval`: no published token statistics are used; both parts are our assumptions, derived
//!   from HumanEval's roughly 450-character prompts (function signature plus docstring) and short
//!   function bodies: prompt log-normal with median 130 and sigma 0.4, output log-normal with
//!   median 120 and sigma 0.5.
//!
//! Sampling uses `rand`'s `StdRng` seeded with `seed_from_u64`, so a given seed gives the same
//! requests with the same `rand` version. Traces and fixed shapes ignore the seed.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// One request's length: prompt tokens and output (generated) tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RequestShape {
    pub prompt_len: usize,
    pub output_len: usize,
}

impl RequestShape {
    /// Prompt plus output tokens: the request's final KV length (saturating, never overflows).
    pub fn total_len(&self) -> usize {
        self.prompt_len.saturating_add(self.output_len)
    }
}

/// A source of request lengths. See the module documentation for where each named distribution's
/// parameters come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// ShareGPT conversations (`sharegpt`).
    ShareGpt,
    /// Alpaca instructions (`alpaca`).
    Alpaca,
    /// Long-prompt arXiv summarization (`arxiv-summarization`).
    ArxivSummarization,
    /// LongBench-style long-context prompts with short answers (`longbench`).
    LongBench,
    /// HumanEval code completion (`humaneval`).
    HumanEval,
    /// Every request has exactly this shape (`fixed:P,O`).
    Fixed(RequestShape),
    /// Prompt and output lengths drawn uniformly from inclusive integer ranges
    /// (`uniform:PMIN-PMAX,OMIN-OMAX`).
    Uniform {
        prompt_min: usize,
        prompt_max: usize,
        output_min: usize,
        output_max: usize,
    },
    /// Recorded request shapes, replayed in order (cycling). `path` is the file they were read
    /// from, if any (`None` for text given to [`Workload::from_jsonl`]).
    Trace {
        path: Option<PathBuf>,
        requests: Vec<RequestShape>,
    },
    /// Requests that share a few prefixes
    /// (`prefix-repetition:NUM_PREFIXES,PREFIX_LEN,SUFFIX_LEN,OUTPUT_LEN`).
    PrefixRepetition(PrefixRepetition),
    /// Concurrent multi-turn chats
    /// (`multi-turn:CONVERSATIONS,TURNS,USER_LEN,OUTPUT_LEN[,THINK_SECONDS]`).
    MultiTurn(MultiTurn),
}

/// The parameters of `prefix-repetition:NUM_PREFIXES,PREFIX_LEN,SUFFIX_LEN,OUTPUT_LEN` (all
/// >= 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PrefixRepetition {
    pub num_prefixes: usize,
    pub prefix_len: usize,
    pub suffix_len: usize,
    pub output_len: usize,
}

impl PrefixRepetition {
    /// Every request's prompt length: prefix plus suffix.
    pub fn prompt_len(&self) -> usize {
        self.prefix_len.saturating_add(self.suffix_len)
    }
}

/// The parameters of `multi-turn:CONVERSATIONS,TURNS,USER_LEN,OUTPUT_LEN[,THINK_SECONDS]`
/// (counts and lengths >= 1, think time >= 0 seconds).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MultiTurn {
    pub conversations: usize,
    pub turns: usize,
    pub user_len: usize,
    pub output_len: usize,
    pub think_seconds: f64,
}

impl MultiTurn {
    /// Requests in all: conversations × turns.
    pub fn requests(&self) -> usize {
        self.conversations.saturating_mul(self.turns)
    }

    /// The prompt length of turn `k` (from 0) when every reply has `OUTPUT_LEN` tokens (as
    /// `ignore_eos` makes them in token ids; a chat template adds its own tokens).
    pub fn prompt_len(&self, k: usize) -> usize {
        (k + 1)
            .saturating_mul(self.user_len)
            .saturating_add(k.saturating_mul(self.output_len))
    }

    /// The longest request: the last turn's prompt plus its reply.
    pub fn max_total_len(&self) -> usize {
        self.turns
            .saturating_mul(self.user_len.saturating_add(self.output_len))
    }
}

/// Why a workload spec or trace could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The spec is not a known name, `fixed:`, `uniform:`, `prefix-repetition:`, `multi-turn:`,
    /// `trace:` or a `.jsonl` path.
    #[error(
        "unknown workload `{name}`: expected one of {}, `fixed:P,O`, `uniform:PMIN-PMAX,OMIN-OMAX`, \
         `{PREFIX_REPETITION_SYNTAX}`, `{MULTI_TURN_SYNTAX}`, a `.jsonl` trace path or `trace:PATH`",
        Workload::NAMED.join(", ")
    )]
    UnknownName { name: String },
    /// A `fixed:`, `uniform:`, `prefix-repetition:`, `multi-turn:` or `trace:` spec with bad
    /// syntax or values; `expected` names the field at fault.
    #[error("bad workload spec `{spec}`: expected {expected}, found {found}")]
    BadSpec {
        spec: String,
        expected: String,
        found: String,
    },
    /// A prefix-sharing workload whose requests cannot fit the model's length: their prompts
    /// cannot be cut without changing what they share.
    #[error(
        "workload `{spec}` needs requests of {needed} tokens (prompt and output), expected at most \
         the model's length of {limit} tokens"
    )]
    TooLong {
        spec: String,
        needed: usize,
        limit: usize,
    },
    /// The trace file could not be read.
    #[error("cannot read trace file `{}`: {error}", path.display())]
    TraceIo {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    /// One line of a JSONL trace is not a valid request. `line` is 1-based.
    #[error("{origin}, line {line}: {reason}")]
    BadTraceLine {
        origin: String,
        line: usize,
        reason: TraceLineError,
    },
    /// The trace holds no requests.
    #[error(
        "{origin} is empty: expected at least one line like {{\"prompt_len\": N, \"output_len\": M}}, \
         found no requests"
    )]
    EmptyTrace { origin: String },
}

/// Why one JSONL trace line is not a request (the line number is added by
/// [`WorkloadError::BadTraceLine`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceLineError {
    /// The line is not JSON; `message` is serde_json's, without its position.
    #[error(
        "expected a JSON object like {TRACE_LINE_FORMAT}, found malformed JSON \
         ({message} at column {column})"
    )]
    MalformedJson { message: String, column: usize },
    /// The line is JSON but not an object; `found` is what it is ("an array", "a number", ...).
    #[error("expected a JSON object like {TRACE_LINE_FORMAT}, found {found}")]
    NotAnObject { found: &'static str },
    /// The object lacks `prompt_len` or `output_len`.
    #[error("missing field `{field}`: expected an object like {TRACE_LINE_FORMAT}")]
    MissingField { field: &'static str },
    /// The field is not a non-negative integer; `found` is its JSON text.
    #[error("field `{field}`: expected a positive integer, found {found}")]
    NotAnInteger { field: &'static str, found: String },
    /// The field is 0.
    #[error("field `{field}`: expected a length >= 1, found 0")]
    Zero { field: &'static str },
    /// The field does not fit a `usize`.
    #[error("field `{field}`: expected at most {}, found {found}", usize::MAX)]
    TooLarge { field: &'static str, found: u64 },
}

/// A one-dimensional length distribution (tokens), before rounding.
#[derive(Debug, Clone, Copy)]
enum LengthDist {
    /// `exp(mu + sigma * z)`, `z` standard normal.
    LogNormal { mu: f64, sigma: f64 },
    /// Uniform over the inclusive integer range.
    UniformInt { min: usize, max: usize },
}

impl LengthDist {
    /// Log-normal whose mean is `mean`.
    fn log_normal_with_mean(mean: f64, sigma: f64) -> LengthDist {
        LengthDist::LogNormal {
            mu: mean.ln() - sigma * sigma / 2.0,
            sigma,
        }
    }

    /// Log-normal whose median is `median`.
    fn log_normal_with_median(median: f64, sigma: f64) -> LengthDist {
        LengthDist::LogNormal {
            mu: median.ln(),
            sigma,
        }
    }

    /// One length, rounded to the nearest integer and at least 1.
    fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        match *self {
            LengthDist::LogNormal { mu, sigma } => {
                let z: f64 = StandardNormal.sample(rng);
                round_len((mu + sigma * z).exp())
            }
            LengthDist::UniformInt { min, max } => {
                let low = min.min(max).max(1);
                let high = min.max(max).max(1);
                rng.random_range(low..=high)
            }
        }
    }
}

/// Rounds a sampled length to the nearest integer, at least 1 (`as` saturates; NaN becomes 0).
fn round_len(value: f64) -> usize {
    (value.round() as usize).max(1)
}

/// Both lengths at least 1; with `max_len = Some(limit)`, the prompt is clamped to `limit - 1`
/// first, then the output to what is left. Both stay >= 1 even if `limit < 2`.
fn clamp_shape(shape: RequestShape, max_len: Option<usize>) -> RequestShape {
    let mut prompt_len = shape.prompt_len.max(1);
    let mut output_len = shape.output_len.max(1);
    if let Some(limit) = max_len {
        prompt_len = prompt_len.min(limit.saturating_sub(1)).max(1);
        output_len = output_len.min(limit.saturating_sub(prompt_len)).max(1);
    }
    RequestShape {
        prompt_len,
        output_len,
    }
}

const PREFIX_REPETITION_SYNTAX: &str =
    "prefix-repetition:NUM_PREFIXES,PREFIX_LEN,SUFFIX_LEN,OUTPUT_LEN";
const MULTI_TURN_SYNTAX: &str =
    "multi-turn:CONVERSATIONS,TURNS,USER_LEN,OUTPUT_LEN[,THINK_SECONDS]";

/// The 90th percentile of the standard normal distribution.
const STANDARD_NORMAL_P90: f64 = 1.2816;

impl Workload {
    /// The named distributions, as accepted by [`Workload::parse`].
    pub const NAMED: &'static [&'static str] = &[
        "sharegpt",
        "alpaca",
        "arxiv-summarization",
        "longbench",
        "humaneval",
    ];

    /// Parse a workload spec: "sharegpt", "alpaca", "arxiv-summarization", "longbench",
    /// "humaneval", "fixed:P,O" (every request P prompt and O output tokens),
    /// "uniform:PMIN-PMAX,OMIN-OMAX" (inclusive integer ranges),
    /// "prefix-repetition:NUM_PREFIXES,PREFIX_LEN,SUFFIX_LEN,OUTPUT_LEN",
    /// "multi-turn:CONVERSATIONS,TURNS,USER_LEN,OUTPUT_LEN[,THINK_SECONDS]" (see the module
    /// documentation), or a path to a JSONL trace file (any spec ending in ".jsonl", or
    /// "trace:PATH"). Surrounding whitespace is ignored. Errors name the field at fault.
    pub fn parse(spec: &str) -> Result<Workload, WorkloadError> {
        let spec = spec.trim();
        if let Some(path) = spec.strip_prefix("trace:") {
            let path = path.trim();
            if path.is_empty() {
                return Err(bad_spec(spec, "`trace:PATH` with a file path", "no path"));
            }
            return Workload::from_jsonl_file(Path::new(path));
        }
        if let Some(rest) = spec.strip_prefix("fixed:") {
            return parse_fixed(spec, rest);
        }
        if let Some(rest) = spec.strip_prefix("uniform:") {
            return parse_uniform(spec, rest);
        }
        if let Some(rest) = spec.strip_prefix("prefix-repetition:") {
            return parse_prefix_repetition(spec, rest);
        }
        if let Some(rest) = spec.strip_prefix("multi-turn:") {
            return parse_multi_turn(spec, rest);
        }
        if spec.ends_with(".jsonl") {
            return Workload::from_jsonl_file(Path::new(spec));
        }
        match spec {
            "sharegpt" => Ok(Workload::ShareGpt),
            "alpaca" => Ok(Workload::Alpaca),
            "arxiv-summarization" => Ok(Workload::ArxivSummarization),
            "longbench" => Ok(Workload::LongBench),
            "humaneval" => Ok(Workload::HumanEval),
            _ => Err(WorkloadError::UnknownName {
                name: spec.to_string(),
            }),
        }
    }

    /// Parse JSONL trace text: one object per line {"prompt_len": N, "output_len": M} (extra
    /// fields ignored; blank lines skipped). Errors name the line number and what was wrong:
    /// malformed JSON, missing field, a zero output_len or prompt_len, and an empty trace.
    pub fn from_jsonl(text: &str) -> Result<Workload, WorkloadError> {
        let requests = parse_jsonl(text, "trace")?;
        Ok(Workload::Trace {
            path: None,
            requests,
        })
    }

    /// Read and parse a JSONL trace file (see [`Workload::from_jsonl`]); errors name the path.
    fn from_jsonl_file(path: &Path) -> Result<Workload, WorkloadError> {
        let text = std::fs::read_to_string(path).map_err(|error| WorkloadError::TraceIo {
            path: path.to_path_buf(),
            error,
        })?;
        let origin = format!("trace file `{}`", path.display());
        let requests = parse_jsonl(&text, &origin)?;
        Ok(Workload::Trace {
            path: Some(path.to_path_buf()),
            requests,
        })
    }

    /// `n` requests, deterministic for a given seed. Traces: the first n (cycling if n > len; an
    /// empty trace gives no requests). Every sampled prompt_len and output_len is >= 1. If
    /// `max_len` is Some(L), each request is clamped so prompt_len + output_len <= L (the prompt
    /// to at most L-1 first, then the output), always keeping both >= 1 (so for L < 2 the
    /// request is 1 + 1 tokens).
    pub fn sample(&self, n: usize, seed: u64, max_len: Option<usize>) -> Vec<RequestShape> {
        let raw: Vec<RequestShape> = match self {
            Workload::Fixed(shape) => vec![*shape; n],
            Workload::Trace { requests, .. } => requests.iter().cycle().take(n).copied().collect(),
            Workload::PrefixRepetition(p) => vec![
                RequestShape {
                    prompt_len: p.prompt_len(),
                    output_len: p.output_len,
                };
                n
            ],
            Workload::MultiTurn(m) => (0..n)
                .map(|i| RequestShape {
                    prompt_len: m.prompt_len(i % m.turns.max(1)),
                    output_len: m.output_len,
                })
                .collect(),
            _ => {
                let (prompt_dist, output_dist) = self.length_distributions();
                let mut rng = StdRng::seed_from_u64(seed);
                (0..n)
                    .map(|_| {
                        let prompt_len = prompt_dist.sample(&mut rng);
                        let output_len = output_dist.sample(&mut rng);
                        RequestShape {
                            prompt_len,
                            output_len,
                        }
                    })
                    .collect()
            }
        };
        raw.into_iter()
            .map(|shape| clamp_shape(shape, max_len))
            .collect()
    }

    /// Whether the workload's requests fit `max_len` tokens. The length workloads always do
    /// ([`Workload::sample`] clamps them); a prefix-sharing one must fit as given
    /// (`multi-turn`: its last turn, replies counted as `OUTPUT_LEN` tokens).
    pub fn check_fits(&self, max_len: usize) -> Result<(), WorkloadError> {
        let needed = match self {
            Workload::PrefixRepetition(p) => p.prompt_len().saturating_add(p.output_len),
            Workload::MultiTurn(m) => m.max_total_len(),
            _ => return Ok(()),
        };
        if needed > max_len {
            return Err(WorkloadError::TooLong {
                spec: self.name(),
                needed,
                limit: max_len,
            });
        }
        Ok(())
    }

    /// Prompt and output distributions of the sampled workloads. Fixed shapes and traces are
    /// handled by [`Workload::sample`] directly; for them this returns their degenerate ranges.
    fn length_distributions(&self) -> (LengthDist, LengthDist) {
        match self {
            Workload::ShareGpt => (
                LengthDist::log_normal_with_mean(161.31, 1.0),
                LengthDist::log_normal_with_mean(337.99, 1.0),
            ),
            Workload::Alpaca => (
                LengthDist::log_normal_with_mean(19.31, 0.6),
                LengthDist::log_normal_with_mean(58.45, 0.6),
            ),
            Workload::ArxivSummarization => (
                LengthDist::log_normal_with_median(
                    2700.0,
                    (3700.0_f64 / 2700.0).ln() / STANDARD_NORMAL_P90,
                ),
                LengthDist::log_normal_with_median(170.0, 0.5),
            ),
            Workload::LongBench => (
                LengthDist::UniformInt {
                    min: 1900,
                    max: 2000,
                },
                LengthDist::log_normal_with_median(64.0, 0.5),
            ),
            Workload::HumanEval => (
                LengthDist::log_normal_with_median(130.0, 0.4),
                LengthDist::log_normal_with_median(120.0, 0.5),
            ),
            Workload::Uniform {
                prompt_min,
                prompt_max,
                output_min,
                output_max,
            } => (
                LengthDist::UniformInt {
                    min: *prompt_min,
                    max: *prompt_max,
                },
                LengthDist::UniformInt {
                    min: *output_min,
                    max: *output_max,
                },
            ),
            Workload::Fixed(shape) => (
                LengthDist::UniformInt {
                    min: shape.prompt_len,
                    max: shape.prompt_len,
                },
                LengthDist::UniformInt {
                    min: shape.output_len,
                    max: shape.output_len,
                },
            ),
            Workload::Trace { .. } | Workload::PrefixRepetition(_) | Workload::MultiTurn(_) => (
                LengthDist::UniformInt { min: 1, max: 1 },
                LengthDist::UniformInt { min: 1, max: 1 },
            ),
        }
    }

    /// Short name for reports ("sharegpt", "fixed:128,256", "uniform:1-10,5-20",
    /// "prefix-repetition:8,2048,128,128", "multi-turn:16,4,64,32,0.5", "trace:PATH", or
    /// "trace:inline" for a trace parsed from text). Every name but "trace:inline" parses back
    /// to the same workload.
    pub fn name(&self) -> String {
        match self {
            Workload::ShareGpt => "sharegpt".to_string(),
            Workload::Alpaca => "alpaca".to_string(),
            Workload::ArxivSummarization => "arxiv-summarization".to_string(),
            Workload::LongBench => "longbench".to_string(),
            Workload::HumanEval => "humaneval".to_string(),
            Workload::Fixed(shape) => format!("fixed:{},{}", shape.prompt_len, shape.output_len),
            Workload::Uniform {
                prompt_min,
                prompt_max,
                output_min,
                output_max,
            } => format!("uniform:{prompt_min}-{prompt_max},{output_min}-{output_max}"),
            Workload::Trace {
                path: Some(path), ..
            } => format!("trace:{}", path.display()),
            Workload::Trace { path: None, .. } => "trace:inline".to_string(),
            Workload::PrefixRepetition(p) => format!(
                "prefix-repetition:{},{},{},{}",
                p.num_prefixes, p.prefix_len, p.suffix_len, p.output_len
            ),
            Workload::MultiTurn(m) => format!(
                "multi-turn:{},{},{},{},{}",
                m.conversations, m.turns, m.user_len, m.output_len, m.think_seconds
            ),
        }
    }
}

fn bad_spec(spec: &str, expected: impl Into<String>, found: impl Into<String>) -> WorkloadError {
    WorkloadError::BadSpec {
        spec: spec.to_string(),
        expected: expected.into(),
        found: found.into(),
    }
}

/// A token count >= 1; `what` names it in errors ("prompt length", ...).
fn parse_len(spec: &str, what: &str, text: &str) -> Result<usize, WorkloadError> {
    let text = text.trim();
    let value: usize = text.parse().map_err(|_| {
        bad_spec(
            spec,
            format!("the {what} as a positive integer"),
            format!("`{text}`"),
        )
    })?;
    if value == 0 {
        return Err(bad_spec(spec, format!("a {what} >= 1"), "0"));
    }
    Ok(value)
}

/// `MIN-MAX`, both >= 1 and MIN <= MAX.
fn parse_range(spec: &str, what: &str, text: &str) -> Result<(usize, usize), WorkloadError> {
    let Some((min_text, max_text)) = text.split_once('-') else {
        return Err(bad_spec(
            spec,
            format!("the {what} range as MIN-MAX"),
            format!("`{}`", text.trim()),
        ));
    };
    let min = parse_len(spec, &format!("minimum {what}"), min_text)?;
    let max = parse_len(spec, &format!("maximum {what}"), max_text)?;
    if min > max {
        return Err(bad_spec(
            spec,
            format!("a {what} range with MIN <= MAX"),
            format!("{min} > {max}"),
        ));
    }
    Ok((min, max))
}

/// Splits `P,O`-style text into exactly two parts.
fn split_pair<'a>(
    spec: &str,
    syntax: &str,
    text: &'a str,
) -> Result<(&'a str, &'a str), WorkloadError> {
    let parts: Vec<&str> = text.split(',').collect();
    match parts.as_slice() {
        [first, second] => Ok((first, second)),
        _ => Err(bad_spec(
            spec,
            format!("`{syntax}` with two comma-separated parts (prompt, output)"),
            format!("{} part(s) in `{text}`", parts.len()),
        )),
    }
}

fn parse_fixed(spec: &str, rest: &str) -> Result<Workload, WorkloadError> {
    let (prompt_text, output_text) = split_pair(spec, "fixed:P,O", rest)?;
    Ok(Workload::Fixed(RequestShape {
        prompt_len: parse_len(spec, "prompt length", prompt_text)?,
        output_len: parse_len(spec, "output length", output_text)?,
    }))
}

fn parse_uniform(spec: &str, rest: &str) -> Result<Workload, WorkloadError> {
    let (prompt_text, output_text) = split_pair(spec, "uniform:PMIN-PMAX,OMIN-OMAX", rest)?;
    let (prompt_min, prompt_max) = parse_range(spec, "prompt length", prompt_text)?;
    let (output_min, output_max) = parse_range(spec, "output length", output_text)?;
    Ok(Workload::Uniform {
        prompt_min,
        prompt_max,
        output_min,
        output_max,
    })
}

/// Splits `text` at commas into `min..=names.len()` fields; `syntax` is the spec's form and
/// `names` the fields' names, for the error.
fn split_fields<'a>(
    spec: &str,
    syntax: &str,
    names: &[&str],
    min: usize,
    text: &'a str,
) -> Result<Vec<&'a str>, WorkloadError> {
    let parts: Vec<&str> = text.split(',').collect();
    if parts.len() < min || parts.len() > names.len() {
        let count = if min == names.len() {
            format!("{min}")
        } else {
            format!("{min} to {}", names.len())
        };
        let missing = names.get(parts.len()..min).unwrap_or(&[]);
        let found = if missing.is_empty() {
            format!("{} fields in `{text}`", parts.len())
        } else {
            format!(
                "{} field(s) in `{text}` (missing {})",
                parts.len(),
                missing.join(", ")
            )
        };
        return Err(bad_spec(
            spec,
            format!("`{syntax}` with {count} comma-separated fields"),
            found,
        ));
    }
    Ok(parts)
}

fn parse_prefix_repetition(spec: &str, rest: &str) -> Result<Workload, WorkloadError> {
    let names = ["NUM_PREFIXES", "PREFIX_LEN", "SUFFIX_LEN", "OUTPUT_LEN"];
    let parts = split_fields(spec, PREFIX_REPETITION_SYNTAX, &names, 4, rest)?;
    let field = |i: usize| parse_len(spec, names[i], parts[i]);
    Ok(Workload::PrefixRepetition(PrefixRepetition {
        num_prefixes: field(0)?,
        prefix_len: field(1)?,
        suffix_len: field(2)?,
        output_len: field(3)?,
    }))
}

fn parse_multi_turn(spec: &str, rest: &str) -> Result<Workload, WorkloadError> {
    let names = [
        "CONVERSATIONS",
        "TURNS",
        "USER_LEN",
        "OUTPUT_LEN",
        "THINK_SECONDS",
    ];
    let parts = split_fields(spec, MULTI_TURN_SYNTAX, &names, 4, rest)?;
    let field = |i: usize| parse_len(spec, names[i], parts[i]);
    let think_seconds = match parts.get(4) {
        None => 0.0,
        Some(text) => {
            let text = text.trim();
            match text.parse::<f64>() {
                Ok(s) if s >= 0.0 && s.is_finite() => s,
                _ => {
                    return Err(bad_spec(
                        spec,
                        "the THINK_SECONDS as a number of seconds >= 0",
                        format!("`{text}`"),
                    ))
                }
            }
        }
    };
    Ok(Workload::MultiTurn(MultiTurn {
        conversations: field(0)?,
        turns: field(1)?,
        user_len: field(2)?,
        output_len: field(3)?,
        think_seconds,
    }))
}

/// Parses JSONL trace text; `origin` names the trace in errors.
fn parse_jsonl(text: &str, origin: &str) -> Result<Vec<RequestShape>, WorkloadError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut requests = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let shape = parse_trace_line(line).map_err(|reason| WorkloadError::BadTraceLine {
            origin: origin.to_string(),
            line: index + 1,
            reason,
        })?;
        requests.push(shape);
    }
    if requests.is_empty() {
        return Err(WorkloadError::EmptyTrace {
            origin: origin.to_string(),
        });
    }
    Ok(requests)
}

const TRACE_LINE_FORMAT: &str = "{\"prompt_len\": N, \"output_len\": M}";

/// One non-blank trace line; the error is the reason, without the line number.
fn parse_trace_line(line: &str) -> Result<RequestShape, TraceLineError> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|error| {
        // serde_json appends "at line 1 column C" (line within this one line); keep the column.
        let message = error.to_string();
        let position = format!(" at line {} column {}", error.line(), error.column());
        TraceLineError::MalformedJson {
            message: message
                .strip_suffix(&position)
                .unwrap_or(&message)
                .to_string(),
            column: error.column(),
        }
    })?;
    let Some(object) = value.as_object() else {
        return Err(TraceLineError::NotAnObject {
            found: json_kind(&value),
        });
    };
    let field = |field: &'static str| -> Result<usize, TraceLineError> {
        let Some(field_value) = object.get(field) else {
            return Err(TraceLineError::MissingField { field });
        };
        let Some(number) = field_value.as_u64() else {
            return Err(TraceLineError::NotAnInteger {
                field,
                found: field_value.to_string(),
            });
        };
        if number == 0 {
            return Err(TraceLineError::Zero { field });
        }
        usize::try_from(number).map_err(|_| TraceLineError::TooLarge {
            field,
            found: number,
        })
    };
    Ok(RequestShape {
        prompt_len: field("prompt_len")?,
        output_len: field("output_len")?,
    })
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
#[path = "workload_tests.rs"]
mod tests;
