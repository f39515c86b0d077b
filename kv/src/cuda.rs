//! The KV caches of the CUDA forward pass: the same books as the CPU's over device memory.
//!
//! - **paged**: [`PagedKv`] over [`DevicePools`] — one `cuMemAlloc` pool per layer's K and V of
//!   blocks of 16 or 32 tokens (token-major inside a block, `[token][kv_head][head_dim]` bf16,
//!   the layout the CUDA paged kernels read), the same [`super::BlockAllocator`] and block
//!   tables (reference counts, audit) as the CPU's, and a step's block table built from them.
//! - **vmm**: [`VmmManager`] on `CudaVmm` (2 MiB pages, `per-layer` or `token-major`), one slot
//!   per sequence, its `Mapper` thread mapping what the engine's hints ask for while the GPU
//!   computes; the attention kernels read it through plain strides.
//!
//! [`GpuKv`] is one of the two; besides the books ([`KvManager`]) it hands the forward pass a
//! step's addressing ([`GpuKvAddressing`]): per sequence its slot or block-table row, and per
//! layer the kernels' [`KvAddress`]. The forward pass never reserves: the scheduler (or a caller
//! running the model directly) reserves first, and the pass checks.

use std::sync::Arc;

use vkv_kernels::cuda::cudarc::driver::CudaContext;
use vkv_kernels::cuda::{DeviceBuffer, KvAddress};
use vkv_vmm::{CudaVmm, MapperOptions, PhysicalMemory};

use super::manager::{
    KvBudget, KvDims, KvManager, KvMode, KvUsage, MapAhead, PrefixCache, SeqId, VmmShape,
};
use super::paged::{BlockStorage, PagedKv, PoolGeometry};
use super::vmm::VmmManager;
use super::{BlockId, KvError};

/// bf16, the CUDA cache's element.
const BF16: usize = 2;

/// The paged cache's pools in device memory (see the module docs).
pub struct DevicePools {
    dims: KvDims,
    geometry: PoolGeometry,
    pool: DeviceBuffer,
}

impl BlockStorage for DevicePools {
    fn copy_block(&mut self, src: BlockId, dst: BlockId) -> Result<(), KvError> {
        for (s, d) in self
            .geometry
            .block_offsets(self.dims, src)
            .zip(self.geometry.block_offsets(self.dims, dst))
        {
            self.pool.copy_within(s, d, self.geometry.block_bytes)?;
        }
        Ok(())
    }
}

impl PagedKv<DevicePools> {
    /// A device cache of `num_blocks` blocks of `block_size` (16 or 32: what the paged kernels
    /// take) tokens over all layers.
    pub fn on_device(
        ctx: &Arc<CudaContext>,
        dims: KvDims,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, KvError> {
        if block_size != 16 && block_size != 32 {
            return Err(KvError::InvalidConfig(format!(
                "block size {block_size}: the CUDA paged kernels take 16 or 32"
            )));
        }
        if num_blocks == 0 {
            return Err(KvError::InvalidConfig(
                "0 blocks: the KV budget holds no block".into(),
            ));
        }
        let geometry = PoolGeometry::new(dims, BF16, num_blocks, block_size);
        let pool = DeviceBuffer::new(ctx, geometry.total(dims))?;
        let storage = DevicePools {
            dims,
            geometry,
            pool,
        };
        Self::from_parts(dims, BF16, num_blocks, block_size, storage)
    }
}

/// The device-side KV cache (see the module docs).
pub enum GpuKv {
    Paged(PagedKv<DevicePools>),
    Vmm(VmmManager),
}

impl GpuKv {
    /// A vmm cache of `shape`: a `KvSpace` on `vmm`, driven by a `Mapper` thread.
    pub fn vmm(vmm: Arc<CudaVmm>, dims: KvDims, shape: VmmShape) -> Result<Self, KvError> {
        let config = dims.space_config(BF16, shape);
        let backend: Arc<dyn PhysicalMemory> = vmm;
        // Pages are created up front by `create_pages_ahead` when the caller wants the whole
        // budget held; the thread tops the pool up otherwise.
        VmmManager::new(config, backend, MapperOptions::default()).map(GpuKv::Vmm)
    }

    /// The engine's cache for `mode`, sized for `budget` (device memory) by the one rule
    /// ([`KvMode::units_for`]); vmm creates all its pages up front, so the device memory is held
    /// from the start like the paged pool and later maps never create.
    pub fn build(
        vmm: &Arc<CudaVmm>,
        mode: KvMode,
        dims: KvDims,
        budget: KvBudget,
    ) -> Result<Self, KvError> {
        let units = mode.units_for(dims, BF16, budget);
        match mode {
            KvMode::Paged { block_size } => {
                PagedKv::on_device(vmm.context(), dims, units, block_size).map(GpuKv::Paged)
            }
            KvMode::Vmm { layout, page_size } => {
                let kv = Self::vmm(
                    vmm.clone(),
                    dims,
                    budget.vmm_shape(layout, page_size, units),
                )?;
                if let GpuKv::Vmm(m) = &kv {
                    m.space().create_ahead(units)?;
                }
                Ok(kv)
            }
        }
    }

    /// The same cache with automatic prefix caching on (either mode: see
    /// [`PagedKv::with_prefix_caching`] and [`VmmManager::with_prefix_caching`]).
    pub fn with_prefix_caching(self) -> Self {
        match self {
            GpuKv::Paged(p) => GpuKv::Paged(p.with_prefix_caching()),
            GpuKv::Vmm(m) => GpuKv::Vmm(m.with_prefix_caching()),
        }
    }

    fn books(&self) -> &dyn KvManager {
        match self {
            GpuKv::Paged(p) => p,
            GpuKv::Vmm(m) => m,
        }
    }

    fn books_mut(&mut self) -> &mut dyn KvManager {
        match self {
            GpuKv::Paged(p) => p,
            GpuKv::Vmm(m) => m,
        }
    }

    /// A step's addressing for the forward pass.
    pub fn addressing(&self) -> GpuKvAddressing<'_> {
        GpuKvAddressing(self)
    }
}

/// What the forward pass reads of a [`GpuKv`] to address one step's KV; it never changes the
/// books.
#[derive(Clone, Copy)]
pub struct GpuKvAddressing<'a>(&'a GpuKv);

impl GpuKvAddressing<'_> {
    pub fn dims(&self) -> KvDims {
        self.0.dims()
    }

    /// Tokens reserved for `seq`.
    pub fn reserved(&self, seq: SeqId) -> Option<usize> {
        self.0.reserved(seq)
    }

    /// The host side of one batch's addressing, for `rows` ≥ `seqs.len()` sequences (the rest
    /// padding, with no KV): per sequence its slot (vmm) or its block-table row (paged), and the
    /// table's width (at least `min_width`; 0 for vmm).
    pub fn index_for(&self, seqs: &[SeqId], rows: usize, min_width: usize) -> (Vec<u32>, usize) {
        match self.0 {
            GpuKv::Paged(p) => {
                let blocks = |s: &SeqId| p.table(*s).map_or(&[][..], |t| t.blocks());
                let width = seqs
                    .iter()
                    .map(|s| blocks(s).len())
                    .max()
                    .unwrap_or(1)
                    .max(min_width)
                    .max(1);
                // Unused entries point past the pool: a read of one would fault, not mislead.
                let mut table = vec![u32::MAX; rows.max(seqs.len()) * width];
                for (b, s) in seqs.iter().enumerate() {
                    let row = blocks(s);
                    table[b * width..b * width + row.len()].copy_from_slice(row);
                }
                (table, width)
            }
            GpuKv::Vmm(m) => {
                let mut slots: Vec<u32> = seqs
                    .iter()
                    .map(|&s| m.slot(s).map_or(u32::MAX, |s| s.0 as u32))
                    .collect();
                slots.resize(rows.max(seqs.len()), u32::MAX);
                (slots, 0)
            }
        }
    }

    /// The paged table width that covers `context` tokens (vmm: 0, no table).
    pub fn table_width(&self, context: usize) -> usize {
        match self.0 {
            GpuKv::Paged(p) => context.div_ceil(p.block_size()),
            GpuKv::Vmm(_) => 0,
        }
    }

    /// The context a decode graph for a longest sequence of `longest` tokens is captured for:
    /// `bucket`, within what a vmm slot holds.
    pub fn graph_context(&self, longest: usize, bucket: usize) -> usize {
        match self.0 {
            GpuKv::Paged(_) => bucket,
            GpuKv::Vmm(m) => bucket.min(m.config().max_tokens).max(longest),
        }
    }

    /// Layer `l`'s addressing, given the uploaded index (`u32` slots or block table).
    pub fn address(&self, l: usize, index: u64, width: usize) -> KvAddress {
        let dims = self.0.dims();
        let row = dims.num_kv_heads * dims.head_dim;
        match self.0 {
            GpuKv::Paged(p) => {
                let s = p.storage();
                let pool = s.geometry.pool_bytes as u64;
                let k = s.pool.ptr() + 2 * l as u64 * pool;
                let block_size = p.block_size();
                KvAddress::Paged {
                    k,
                    v: k + pool,
                    block_table: index,
                    max_blocks: width as u32,
                    block_size: block_size as u32,
                    block_stride: (block_size * row) as u64,
                    token_stride: row as u64,
                    head_stride: dims.head_dim as u64,
                }
            }
            GpuKv::Vmm(m) => {
                let v = m.view(l);
                KvAddress::Strided {
                    k: v.k,
                    v: v.v,
                    slots: index,
                    slot_stride: v.slot_stride as u64,
                    token_stride: v.token_stride as u64,
                    head_stride: v.head_stride as u64,
                }
            }
        }
    }

    /// Tokens a sequence can address through a paged table of `width` columns (vmm: a slot's).
    pub fn capacity(&self, width: usize) -> usize {
        match self.0 {
            GpuKv::Paged(p) => width * p.block_size(),
            GpuKv::Vmm(m) => m.config().max_tokens,
        }
    }
}

/// The books the scheduler and the engine keep through (the same trait as the CPU caches).
impl KvManager for GpuKv {
    fn dims(&self) -> KvDims {
        self.books().dims()
    }
    fn name(&self) -> String {
        self.books().name()
    }
    fn capacity_tokens(&self) -> usize {
        self.books().capacity_tokens()
    }
    fn bytes_per_token(&self) -> usize {
        self.books().bytes_per_token()
    }
    fn reserve(&mut self, seq: SeqId, len: usize) -> Result<(), KvError> {
        self.books_mut().reserve(seq, len)
    }
    fn fork(&mut self, src: SeqId, dst: SeqId, tokens: usize) -> Result<(), KvError> {
        self.books_mut().fork(src, dst, tokens)
    }
    fn free(&mut self, seq: SeqId) -> Result<(), KvError> {
        self.books_mut().free(seq)
    }
    fn reserved(&self, seq: SeqId) -> Option<usize> {
        self.books().reserved(seq)
    }
    fn usage(&self) -> KvUsage {
        self.books().usage()
    }
    fn audit(&self) -> Result<(), KvError> {
        self.books().audit()
    }
    fn map_ahead(&self) -> Option<&dyn MapAhead> {
        self.books().map_ahead()
    }
    fn map_ahead_mut(&mut self) -> Option<&mut dyn MapAhead> {
        self.books_mut().map_ahead_mut()
    }
    fn prefix_cache(&self) -> Option<&dyn PrefixCache> {
        self.books().prefix_cache()
    }
    fn prefix_cache_mut(&mut self) -> Option<&mut dyn PrefixCache> {
        self.books_mut().prefix_cache_mut()
    }
    fn enable_prefix_caching(&mut self) -> Result<(), KvError> {
        self.books_mut().enable_prefix_caching()
    }
}
