//! The two ways a CUDA kernel addresses the KV cache ([`KvAddress`]): **strided** — base
//! pointers plus slot, token and head strides, vAttention's point (one contiguous kernel serves a
//! vmm `KvSpace` in either layout and a plain tensor) — and **paged**, vLLM's PagedAttention
//! block table of 16- or 32-token blocks.
//!
//! It owns the host-side checks every launcher makes of an address before a launch: 16-byte
//! alignment of the K and V bases, 4-byte alignment of the slot / block-table pointer, strides in
//! whole 16-byte vectors (multiples of 8 elements), a block size the kernels are built for, and a
//! block table that covers `max_context`; a failure is a [`KernelError`], never a panic. What only
//! the device holds (slot indices, block-table entries) stays the caller's promise. It also
//! flattens an address into what the kernels' parameter structs take ([`KvAddress::parts`]):
//! one index pointer and outer stride for both modes, and the name suffix of the kernel
//! instance (`strided`, `paged16`, `paged32`).

use crate::cuda::error::{KernelError, Result};

/// Where the KV of a batch lives. Strides are in elements; element `(token t, head h, dim d)` of
/// sequence `b` is at:
/// - strided: `k + slots[b]·slot_stride + t·token_stride + h·head_stride + d`;
/// - paged: `k + table[b·max_blocks + t / block_size]·block_stride + (t % block_size)·token_stride
///   + h·head_stride + d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvAddress {
    Strided {
        k: u64,
        v: u64,
        /// Device `u32[batch]`: the slot of each sequence.
        slots: u64,
        slot_stride: u64,
        token_stride: u64,
        head_stride: u64,
    },
    Paged {
        k: u64,
        v: u64,
        /// Device `u32[batch][max_blocks]`.
        block_table: u64,
        max_blocks: u32,
        /// 16 or 32.
        block_size: u32,
        block_stride: u64,
        token_stride: u64,
        head_stride: u64,
    },
}

impl KvAddress {
    /// A paged cache's block table must cover `max_context` tokens (strided ones always do).
    pub(super) fn check_context(&self, max_context: usize) -> Result<()> {
        if let KvAddress::Paged {
            max_blocks,
            block_size,
            ..
        } = *self
        {
            let cap = max_blocks as usize * block_size as usize;
            if max_context > cap {
                return Err(KernelError::Shape(format!(
                    "max_context {max_context} exceeds the block table's {max_blocks} blocks × {block_size} tokens"
                )));
            }
        }
        Ok(())
    }

    pub(super) fn parts(&self) -> (u64, u64, u64, u64, u64, u64, u32, &'static str) {
        match *self {
            KvAddress::Strided {
                k,
                v,
                slots,
                slot_stride,
                token_stride,
                head_stride,
            } => (
                k,
                v,
                slots,
                slot_stride,
                token_stride,
                head_stride,
                0,
                "strided",
            ),
            KvAddress::Paged {
                k,
                v,
                block_table,
                max_blocks,
                block_size,
                block_stride,
                token_stride,
                head_stride,
            } => (
                k,
                v,
                block_table,
                block_stride,
                token_stride,
                head_stride,
                max_blocks,
                if block_size == 32 {
                    "paged32"
                } else {
                    "paged16"
                },
            ),
        }
    }

    pub(super) fn check(&self) -> Result<()> {
        let (k, v, index, outer, token, head, _, _) = self.parts();
        aligned("K base pointer", k, 16)?;
        aligned("V base pointer", v, 16)?;
        aligned("slot / block-table pointer", index, 4)?;
        aligned("slot / block stride (elements)", outer, 8)?;
        aligned("token stride (elements)", token, 8)?;
        aligned("head stride (elements)", head, 8)?;
        if let KvAddress::Paged {
            block_size,
            max_blocks,
            ..
        } = *self
        {
            if block_size != 16 && block_size != 32 {
                return Err(KernelError::Shape(format!(
                    "block size {block_size}: the paged kernels take 16 or 32"
                )));
            }
            if max_blocks == 0 {
                return Err(KernelError::Shape("a block table of 0 columns".into()));
            }
        }
        Ok(())
    }
}

pub(super) fn aligned(what: &'static str, value: u64, align: u64) -> Result<()> {
    if !value.is_multiple_of(align) {
        return Err(KernelError::Misaligned { what, value, align });
    }
    Ok(())
}
