//! The shape of a [`KvSpace`](super::KvSpace) in virtual memory: its two layouts ([`KvLayout`]),
//! keys or values ([`KvPart`]), and its configuration ([`KvSpaceConfig`]) with the byte arithmetic
//! every address and page count comes from — bytes per head-row and per token, regions, bytes a
//! token takes in one region, the slot stride, the pages a slot needs in each region.
//!
//! Invariants: a valid config ([`KvSpaceConfig::validate`]) has every dimension above 0 and
//! reserves at most 128 TiB (2^47 bytes) of address space in all; the slot stride is `max_tokens`
//! tokens rounded up to whole pages, so page `i` of slot `s` in region `r` starts at
//! `base[r] + s · slot_stride + i · page_size` and no page straddles two slots. The layouts are
//! vAttention's (Prabhu et al., 2024): `per-layer` its per-layer K and V tensors, `token-major`
//! its "megacache" (vLLM PR #6102), all layers of a token in one page.

use std::fmt;
use std::str::FromStr;

use crate::{Result, VmmError};

/// How a [`KvSpace`](super::KvSpace) lays K and V out in virtual memory (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvLayout {
    /// Per layer, a K and a V region `[slot][token][kv_head][head_dim]`.
    PerLayer,
    /// One region `[slot][token][layer][K|V][kv_head][head_dim]`.
    TokenMajor,
}

impl KvLayout {
    pub const ALL: [KvLayout; 2] = [KvLayout::PerLayer, KvLayout::TokenMajor];

    pub fn as_str(self) -> &'static str {
        match self {
            KvLayout::PerLayer => "per-layer",
            KvLayout::TokenMajor => "token-major",
        }
    }
}

impl fmt::Display for KvLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KvLayout {
    type Err = VmmError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "per-layer" => Ok(KvLayout::PerLayer),
            "token-major" => Ok(KvLayout::TokenMajor),
            other => Err(VmmError::InvalidConfig(format!(
                "unknown KV layout {other:?}: expected per-layer or token-major"
            ))),
        }
    }
}

/// Keys or values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvPart {
    K = 0,
    V = 1,
}

/// Shape and budget of a [`KvSpace`](super::KvSpace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvSpaceConfig {
    pub layout: KvLayout,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Bytes per element (2 for bf16/f16, 4 for f32).
    pub dtype_bytes: usize,
    pub max_slots: usize,
    pub max_tokens: usize,
    /// Bytes per physical page: a positive multiple of the backend's granularity.
    pub page_size: usize,
    /// Physical budget: at most this many pages exist at once.
    pub max_pages: usize,
}

impl KvSpaceConfig {
    /// Bytes of K (or of V) of one token in one layer.
    pub fn head_bytes(&self) -> usize {
        self.num_kv_heads * self.head_dim * self.dtype_bytes
    }

    /// Bytes of K and V of one token over all layers.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.head_bytes()
    }

    /// Number of regions (separately reserved tensors): `2 · layers` or 1.
    pub fn num_regions(&self) -> usize {
        match self.layout {
            KvLayout::PerLayer => 2 * self.num_layers,
            KvLayout::TokenMajor => 1,
        }
    }

    /// Bytes one token takes in one region.
    pub fn region_bytes_per_token(&self) -> usize {
        match self.layout {
            KvLayout::PerLayer => self.head_bytes(),
            KvLayout::TokenMajor => self.bytes_per_token(),
        }
    }

    /// Bytes of one slot's range in one region: `max_tokens` tokens rounded up to whole pages.
    pub fn slot_stride(&self) -> usize {
        (self.max_tokens * self.region_bytes_per_token()).next_multiple_of(self.page_size.max(1))
    }

    /// Physical pages a slot needs in *each* region to hold `tokens` tokens.
    pub fn pages_for(&self, tokens: usize) -> usize {
        (tokens * self.region_bytes_per_token()).div_ceil(self.page_size)
    }

    /// The unit of prefix caching: the fewest whole pages per region that hold whole tokens,
    /// as `(pages per region, tokens)` — one page row, `page_size / region_bytes_per_token`
    /// tokens, when a page holds whole tokens (every power-of-two shape), else
    /// `lcm(page_size, region_bytes_per_token)` bytes of pages (a 28-layer bf16 model's
    /// token-major 2 MiB pages: 7 pages of 256 tokens).
    pub fn prefix_unit(&self) -> (usize, usize) {
        let (page, token) = (self.page_size.max(1), self.region_bytes_per_token().max(1));
        let (mut a, mut b) = (page, token);
        while b != 0 {
            (a, b) = (b, a % b);
        }
        // lcm / page_size pages, lcm / region_bytes_per_token tokens.
        (token / a, page / a)
    }

    pub(super) fn validate(&self) -> Result<()> {
        let fields = [
            ("num_layers", self.num_layers),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("dtype_bytes", self.dtype_bytes),
            ("max_slots", self.max_slots),
            ("max_tokens", self.max_tokens),
            ("page_size", self.page_size),
        ];
        if let Some((name, _)) = fields.iter().find(|(_, v)| *v == 0) {
            return Err(VmmError::InvalidConfig(format!("{name} must be > 0")));
        }
        let reserved =
            (self.max_tokens as u128) * (self.bytes_per_token() as u128) * (self.max_slots as u128);
        if reserved > (1u128 << 47) {
            return Err(VmmError::InvalidConfig(format!(
                "{} slots × {} tokens × {} B/token = {reserved} B of address space, over the 128 TiB limit",
                self.max_slots,
                self.max_tokens,
                self.bytes_per_token()
            )));
        }
        Ok(())
    }
}
