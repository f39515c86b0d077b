//! The one error type of the vmm crate. Every failure a caller can provoke (bad sizes, too many
//! tokens or slots, an exhausted pool, a driver call that fails) is a variant here; none panics.

/// Errors of the vmm crate; each says what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("page size {page_size} B is not a positive multiple of the {backend} backend's granularity ({granularity} B)")]
    PageSizeNotAligned {
        backend: &'static str,
        page_size: usize,
        granularity: usize,
    },
    #[error("page pool exhausted: {needed} more page(s) of {page_size} B needed, {available} available (limit {max_pages} pages, {created} created, {free} free)")]
    PoolExhausted {
        needed: usize,
        available: usize,
        page_size: usize,
        max_pages: usize,
        created: usize,
        free: usize,
    },
    #[error("slot {slot} asked for {requested} tokens, more than max_tokens = {max_tokens}")]
    TooManyTokens {
        slot: usize,
        requested: usize,
        max_tokens: usize,
    },
    #[error("no free slot: all {max_slots} slots (max_slots) are in use")]
    NoFreeSlot { max_slots: usize },
    #[error("slot {slot} does not exist: the space has {max_slots} slots")]
    UnknownSlot { slot: usize, max_slots: usize },
    #[error("slot {slot} is not active (acquire it first, or it was released)")]
    SlotNotActive { slot: usize },
    #[error("cannot share {tokens} tokens from slot {src}: it is backed for {backed} tokens")]
    ShareBeyondSource {
        src: usize,
        tokens: usize,
        backed: usize,
    },
    #[error("cannot share a slot's prefix into itself (slot {slot})")]
    ShareIntoSelf { slot: usize },
    #[error(
        "range [{offset}, {end}) of slot {slot} region {region} is not backed by mapped pages"
    )]
    NotBacked {
        slot: usize,
        region: usize,
        offset: usize,
        end: usize,
    },
    #[error("invalid KV space configuration: {0}")]
    InvalidConfig(String),
    #[error(
        "address range {addr:#x}+{bytes:#x} is not inside a reservation of the {backend} backend"
    )]
    OutsideReservation {
        backend: &'static str,
        addr: u64,
        bytes: usize,
    },
    #[error("{backend}: {call} failed: out of device memory ({detail})")]
    DeviceOutOfMemory {
        backend: &'static str,
        call: &'static str,
        detail: String,
    },
    #[error("{backend}: {call} failed: {detail}")]
    Backend {
        backend: &'static str,
        call: &'static str,
        detail: String,
    },
    #[error("the {backend} backend holds no bytes: {op} is not available")]
    NoBytes {
        backend: &'static str,
        op: &'static str,
    },
    #[error("no CUDA device: {0}")]
    NoCuda(String),
    #[error("the mapper thread has stopped")]
    MapperStopped,
    #[error("no page cache is installed in this KV space; expected one (set_page_cache) before pinning pages")]
    NoPageCache,
    #[error("page {handle} is not mapped anywhere; expected a mapped page to pin")]
    PinUnmapped { handle: u64 },
    #[error("page {handle} is already pinned by the page cache; expected an unpinned page")]
    AlreadyPinned { handle: u64 },
    #[error("page {handle} is not pinned by the page cache; expected a cached (pinned) page")]
    NotPinned { handle: u64 },
    #[error("slot {slot} holds {len} tokens; expected an empty slot (length 0)")]
    SlotNotEmpty { slot: usize, len: usize },
    #[error("a cached unit of this space has {expected} pages (pages per unit × regions), found {found}")]
    UnitShape { expected: usize, found: usize },
    #[error("the page cache's books disagree with the space: {0}")]
    PageCache(String),
}

pub type Result<T, E = VmmError> = std::result::Result<T, E>;

impl VmmError {
    /// A failed OS call, with `errno` read now.
    pub(crate) fn os(backend: &'static str, call: &'static str) -> Self {
        VmmError::Backend {
            backend,
            call,
            detail: std::io::Error::last_os_error().to_string(),
        }
    }
}
