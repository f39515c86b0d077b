// vkv attention kernels: decode (one query token per sequence), prefill (ragged query chunks over
// their cached prefix; see the prefill section) and KV append, in two addressing modes: strided
// (base + slot / token / head strides: a vmm KvSpace in either layout, or a plain tensor) and
// paged (a block table over a pool of blocks of 16 or 32 tokens).
//
// Decode follows flash-decoding (Dao et al., 2023): a CTA owns one KV head of one sequence (and
// one split of its context when the grid would otherwise be too small to fill the GPU); it reads
// each K and V row once for every query head that shares it (GQA, as FlashAttention-2 and vLLM's
// paged attention do), keeps an online softmax (Milakov & Gimelshein 2018; FlashAttention) per
// lane group, combines the groups through shared memory, and either writes the normalized output
// or, with several splits, an unnormalized partial and its (max, sum) for `decode_reduce`.
//
// Loads are 16 bytes per lane (8 elements); a token's head row of D elements is read by D/8
// consecutive lanes, so one warp reads 32·16 = 512 contiguous-per-row bytes per step. Scores are
// kept in the log2 domain (the scale is pre-multiplied by log2(e)) and exponentials are exp2f.
//
// No CUDA headers are included (NVRTC then needs no include path): bf16 / f16 are bit patterns
// converted with shifts and cvt instructions.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF (-__int_as_float(0x7f800000))

// ---- element types ---------------------------------------------------------------------------

struct Bf16 {
    static __device__ __forceinline__ float lo(u32 w) { return __uint_as_float(w << 16); }
    static __device__ __forceinline__ float hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
    static __device__ __forceinline__ u16 from_float(float f) {
        u32 u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
        u += 0x7fffu + ((u >> 16) & 1u);                       // round to nearest even
        return (u16)(u >> 16);
    }
};

struct F16 {
    static __device__ __forceinline__ float cvt(u16 h) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
    static __device__ __forceinline__ float lo(u32 w) { return cvt((u16)(w & 0xffffu)); }
    static __device__ __forceinline__ float hi(u32 w) { return cvt((u16)(w >> 16)); }
    static __device__ __forceinline__ u16 from_float(float f) {
        u16 h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
};

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& r, float* f) {
    f[0] = T::lo(r.x); f[1] = T::hi(r.x);
    f[2] = T::lo(r.y); f[3] = T::hi(r.y);
    f[4] = T::lo(r.z); f[5] = T::hi(r.z);
    f[6] = T::lo(r.w); f[7] = T::hi(r.w);
}

// 16-byte read-only load that does not allocate in L1 (KV is streamed once).
__device__ __forceinline__ uint4 load_stream(const u16* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

// ---- parameters (mirrored by #[repr(C)] structs in kernels/src/cuda/attention.rs) -------------

struct DecodeParams {
    u64 q;            // [batch][n_heads][D]
    u64 k, v;         // strided: base of slot 0; paged: base of block 0
    u64 out;          // [batch][n_heads][D]
    u64 part_o;       // f32 [batch][n_heads][splits][D] (splits > 1)
    u64 part_ml;      // f32 [batch][n_heads][splits][2]  (max, sum) in the log2 domain
    u64 lens;         // u32 [batch]: context length of each sequence
    u64 index;        // strided: u32 slot of each sequence; paged: u32 block table [batch][max_blocks]
    u64 outer_stride; // strided: slot stride; paged: block stride (elements)
    u64 token_stride; // elements
    u64 head_stride;  // elements
    u32 batch, n_heads, n_kv_heads, group;
    u32 splits, split_tokens, max_blocks, max_context;
    float scale_log2;
    u32 head_chunks;  // ceil(group / GMAX): CTAs per KV head when the group is larger than GMAX
};

struct AppendParams {
    u64 k_new, v_new; // [n_tokens][n_kv_heads][D]
    u64 k, v;
    u64 seq;          // u32 [n_tokens]: which sequence (slot index / block-table row)
    u64 pos;          // u32 [n_tokens]: position of the token in its sequence
    u64 index;
    u64 outer_stride, token_stride, head_stride;
    u32 n_tokens, n_kv_heads, head_dim, max_blocks;
};

// ---- addressing ------------------------------------------------------------------------------

// Element offset of token t of sequence b (head 0, dim 0).
struct Strided {
    u64 seq_base;
    u64 token_stride;
    __device__ __forceinline__ Strided(const u32* index, u64 outer, u64 ts, u32 b, u32)
        : seq_base((u64)index[b] * outer), token_stride(ts) {}
    __device__ __forceinline__ u64 at(u32 t) const { return seq_base + (u64)t * token_stride; }
    static __device__ __forceinline__ u32 capacity(u32 max_blocks) { return 0xffffffffu; }
};

template <int BS>
struct Paged {
    const u32* row;
    u64 block_stride, token_stride;
    __device__ __forceinline__ Paged(const u32* index, u64 outer, u64 ts, u32 b, u32 max_blocks)
        : row(index + (u64)b * max_blocks), block_stride(outer), token_stride(ts) {}
    __device__ __forceinline__ u64 at(u32 t) const {
        return (u64)__ldg(row + t / BS) * block_stride + (u64)(t % BS) * token_stride;
    }
    static __device__ __forceinline__ u32 capacity(u32 max_blocks) { return max_blocks * BS; }
};

// ---- decode ----------------------------------------------------------------------------------

constexpr int NWARPS = 4;

template <typename T, int D, int GMAX, typename Addr>
__device__ __forceinline__ void decode_body(const DecodeParams& p) {
    constexpr int LPT = D / 8;        // lanes per token row
    constexpr int TPW = 32 / LPT;     // tokens per warp step
    constexpr int NG = NWARPS * TPW;  // lane groups per CTA
    constexpr int U = GMAX >= 8 ? 2 : 4;  // tokens per lane group in flight
    constexpr int STEP = NG * U;      // tokens per CTA per iteration

    __shared__ float sm_o[NG][GMAX][D];
    __shared__ float sm_m[NG][GMAX];
    __shared__ float sm_l[NG][GMAX];

    const u32 kvh = blockIdx.x / p.head_chunks;
    const u32 chunk = blockIdx.x % p.head_chunks;
    const u32 b = blockIdx.y;
    const u32 split = blockIdx.z;
    const u32 h0 = kvh * p.group + chunk * GMAX;           // first query head of this CTA
    const u32 nh = min((u32)GMAX, p.group - chunk * GMAX);  // query heads of this CTA

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int sub = lane / LPT, dl = lane % LPT;
    const int grp = warp * TPW + sub;

    u32 ctx = min(((const u32*)p.lens)[b], p.max_context);
    ctx = min(ctx, Addr::capacity(p.max_blocks));
    const u32 t_begin = split * p.split_tokens;
    const u32 t_end = min(ctx, t_begin + p.split_tokens);

    // This lane's 8 dims of each query head, pre-scaled.
    float qf[GMAX][8];
    const u16* q = (const u16*)p.q;
#pragma unroll
    for (int h = 0; h < GMAX; ++h) {
        if (h < (int)nh) {
            uint4 r = *(const uint4*)(q + ((u64)b * p.n_heads + h0 + h) * D + dl * 8);
            unpack8<T>(r, qf[h]);
#pragma unroll
            for (int i = 0; i < 8; ++i) qf[h][i] *= p.scale_log2;
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) qf[h][i] = 0.f;
        }
    }

    float m[GMAX], l[GMAX], o[GMAX][8];
#pragma unroll
    for (int h = 0; h < GMAX; ++h) {
        m[h] = NEG_INF;
        l[h] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) o[h][i] = 0.f;
    }

    const Addr addr((const u32*)p.index, p.outer_stride, p.token_stride, b, p.max_blocks);
    const u16* kb = (const u16*)p.k + (u64)kvh * p.head_stride + dl * 8;
    const u16* vb = (const u16*)p.v + (u64)kvh * p.head_stride + dl * 8;

    // The loop bound is uniform over the warp (shuffles below need every lane).
    for (u32 base = t_begin + warp * TPW; base < t_end; base += STEP) {
        uint4 kr[U], vr[U];
        bool valid[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const u32 t = base + sub + u * NG;
            valid[u] = t < t_end;
            if (valid[u]) {
                const u64 off = addr.at(t);
                kr[u] = load_stream(kb + off);
                vr[u] = load_stream(vb + off);
            } else {
                kr[u] = make_uint4(0, 0, 0, 0);
                vr[u] = make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float kf[8], vf[8];
            unpack8<T>(kr[u], kf);
            float s[GMAX];
#pragma unroll
            for (int h = 0; h < GMAX; ++h) {
                float acc = 0.f;
#pragma unroll
                for (int i = 0; i < 8; ++i) acc = fmaf(qf[h][i], kf[i], acc);
#pragma unroll
                for (int off = LPT / 2; off > 0; off /= 2)
                    acc += __shfl_xor_sync(0xffffffffu, acc, off);
                s[h] = acc;
            }
            if (valid[u]) {
                unpack8<T>(vr[u], vf);
#pragma unroll
                for (int h = 0; h < GMAX; ++h) {
                    if (s[h] > m[h]) {
                        const float corr = exp2f(m[h] - s[h]);
                        l[h] *= corr;
#pragma unroll
                        for (int i = 0; i < 8; ++i) o[h][i] *= corr;
                        m[h] = s[h];
                    }
                    const float e = exp2f(s[h] - m[h]);
                    l[h] += e;
#pragma unroll
                    for (int i = 0; i < 8; ++i) o[h][i] = fmaf(e, vf[i], o[h][i]);
                }
            }
        }
    }

    // Combine the lane groups.
#pragma unroll
    for (int h = 0; h < GMAX; ++h) {
#pragma unroll
        for (int i = 0; i < 8; ++i) sm_o[grp][h][dl * 8 + i] = o[h][i];
        if (dl == 0) {
            sm_m[grp][h] = m[h];
            sm_l[grp][h] = l[h];
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < GMAX * D; e += NWARPS * 32) {
        const int h = e / D, d = e % D;
        if (h >= (int)nh) continue;
        float mx = NEG_INF;
        for (int g = 0; g < NG; ++g) mx = fmaxf(mx, sm_m[g][h]);
        float sum = 0.f, acc = 0.f;
        if (mx != NEG_INF) {
            for (int g = 0; g < NG; ++g) {
                const float w = exp2f(sm_m[g][h] - mx);
                sum += w * sm_l[g][h];
                acc += w * sm_o[g][h][d];
            }
        }
        const u64 row = (u64)b * p.n_heads + h0 + h;
        if (p.splits == 1) {
            ((u16*)p.out)[row * D + d] = T::from_float(sum > 0.f ? acc / sum : 0.f);
        } else {
            ((float*)p.part_o)[(row * p.splits + split) * D + d] = acc;
            if (d == 0) {
                ((float*)p.part_ml)[(row * p.splits + split) * 2] = mx;
                ((float*)p.part_ml)[(row * p.splits + split) * 2 + 1] = sum;
            }
        }
    }
}

// Combine the splits of each (sequence, query head): one CTA of D threads each.
template <typename T, int D>
__device__ __forceinline__ void reduce_body(const DecodeParams& p) {
    const u64 row = (u64)blockIdx.y * p.n_heads + blockIdx.x;
    const int d = threadIdx.x;
    const float* ml = (const float*)p.part_ml + row * p.splits * 2;
    const float* po = (const float*)p.part_o + row * p.splits * D;
    float mx = NEG_INF;
    for (u32 s = 0; s < p.splits; ++s) mx = fmaxf(mx, ml[2 * s]);
    float sum = 0.f, acc = 0.f;
    if (mx != NEG_INF) {
        for (u32 s = 0; s < p.splits; ++s) {
            const float w = exp2f(ml[2 * s] - mx);
            sum += w * ml[2 * s + 1];
            acc += w * po[s * D + d];
        }
    }
    ((u16*)p.out)[row * D + d] = T::from_float(sum > 0.f ? acc / sum : 0.f);
}

#define DECODE(TN, T, D, G, AN, A)                                                           \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32)                                \
        decode_##TN##_d##D##_g##G##_##AN(const DecodeParams p) {                             \
        decode_body<T, D, G, A>(p);                                                          \
    }

#define DECODE_G(TN, T, D, AN, A) \
    DECODE(TN, T, D, 1, AN, A)    \
    DECODE(TN, T, D, 2, AN, A)    \
    DECODE(TN, T, D, 4, AN, A)    \
    DECODE(TN, T, D, 8, AN, A)

#define DECODE_A(TN, T, D)                 \
    DECODE_G(TN, T, D, strided, Strided)   \
    DECODE_G(TN, T, D, paged16, Paged<16>) \
    DECODE_G(TN, T, D, paged32, Paged<32>) \
    extern "C" __global__ void decode_reduce_##TN##_d##D(const DecodeParams p) { reduce_body<T, D>(p); }

DECODE_A(bf16, Bf16, 64)
DECODE_A(bf16, Bf16, 128)
DECODE_A(f16, F16, 64)
DECODE_A(f16, F16, 128)

// ---- prefill ---------------------------------------------------------------------------------
//
// Causal attention of a ragged batch of query chunks whose K / V (prefix and the chunk itself) are
// already in the cache (chunked prefill). FlashAttention-2's schedule and tiling (Dao, 2023; its
// hdim-128 forward configuration): a CTA of 4 warps owns 128 query rows of one query head, 32 rows
// a warp as two m16 tiles, so every K and V fragment read from shared memory feeds two mma.sync
// instructions per warp (with 16 rows a warp, ldmatrix traffic — 128 B/clock/SM — was the limit).
// Q is staged once in shared memory and read per k-step with ldmatrix; keys are walked in tiles of
// 64 staged in shared memory and double-buffered with cp.async (one barrier a tile: the copy of
// tile n + 1 is issued after it, into the stage tile n − 1 used); S = Q·Kᵀ and O += P·V run on
// mma.sync.m16n8k16 (f32 accumulation; V through ldmatrix.trans); the online softmax stays in
// registers with raw scores, the log2(e)-folded scale applied in one FFMA before ex2.approx; P is
// rounded to the input type for the second product, as FlashAttention does; O is rescaled only
// when a row's maximum grows by more than 2^8 (FlashAttention-4's conditional rescaling). The
// causal mask exists only in the inlined copy of the tile step (MASKED = true) that runs on tiles
// crossing a warp's diagonal or the context end. CTAs are numbered so the longest tiles (last
// query rows, most keys) of every (sequence, head) start first, which keeps the causal tail short;
// CTAs of one KV head's query heads are adjacent, so their K / V tiles are read from L2 after the
// first.

struct PrefillParams {
    u64 q;            // [total_q][n_heads][D], sequences packed one after another
    u64 k, v;
    u64 out;          // like q
    u64 q_start;      // u32 [batch + 1]: first query row of each sequence
    u64 lens;         // u32 [batch]: context length including the chunk
    u64 index;
    u64 outer_stride, token_stride, head_stride;
    u32 batch, n_heads, n_kv_heads, group;
    u32 max_blocks, max_context;
    float scale_log2;
    u32 pad;
};

template <typename T> struct Mma;
template <> struct Mma<Bf16> {
    static __device__ __forceinline__ void run(float* c, const u32* a, u32 b0, u32 b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct Mma<F16> {
    static __device__ __forceinline__ void run(float* c, const u32* a, u32 b0, u32 b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

// Two floats to a packed pair (lo in the low half), one cvt instruction each way.
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi);
template <> __device__ __forceinline__ u32 pack2<Bf16>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <> __device__ __forceinline__ u32 pack2<F16>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// Dynamic shared memory of a prefill CTA: (PF_BM query rows + 2 stages × (K, V) × PF_BN rows) ×
// (D + 8) elements × 2 bytes, + PF_RING_BYTES (the launcher computes the same).
constexpr int PF_BM = 128, PF_BN = 64, PF_WARPS = 4;
// Bytes after the K / V stages: two slots of up to 8 block-table entries (PF_BN / 16 = 4 used).
constexpr int PF_RING_BYTES = 64;
// Growth of a row's maximum (log2 units) that prefill tolerates before rescaling O.
constexpr float RESCALE_LOG2 = 8.f;

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;"); }

// 16-byte asynchronous copy global -> shared address `dst`; `valid` false writes 16 zero bytes.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
}

// Four 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldsm4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm4t(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// 4-byte asynchronous copy (block-table entries); `valid` false writes zeros.
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src),
                 "r"(valid ? 4 : 0));
}

// Where the K / V rows of a prefill key tile are. Strided addressing computes them; paged
// addressing reads the tile's block-table entries from a shared-memory ring, into which they were
// copied (cp.async) one tile ahead, so no global-memory latency stands in front of the tile's
// K / V copies. `row(…, rr, k)` is the offset of tile row rr + k, for rr < RSTEP (the copy's row
// step, which divides 16) and k a multiple of RSTEP (a constant once the copy loop is unrolled).
template <typename Addr> struct TileRows;
template <> struct TileRows<Strided> {
    static __device__ __forceinline__ void fetch(const Strided&, u32, int, int, int) {}
    static __device__ __forceinline__ u64 row(const Strided& a, const u32*, int n0, int rr, int k) {
        return a.at((u32)(n0 + rr + k));
    }
};
template <int BS> struct TileRows<Paged<BS>> {
    static constexpr int ENTRIES = PF_BN / BS;
    static __device__ __forceinline__ void fetch(const Paged<BS>& a, u32 dst, int n0, int kv_end,
                                                 int tid) {
        if (tid < ENTRIES) {
            const int blk = n0 / BS + tid;
            const bool ok = blk * BS < kv_end;
            cp_async4(dst + tid * 4, a.row + (ok ? blk : 0), ok);
        }
    }
    static __device__ __forceinline__ u64 row(const Paged<BS>& a, const u32* ent, int, int rr,
                                              int k) {
        return (u64)ent[k / BS] * a.block_stride + (u64)(rr + k % BS) * a.token_stride;
    }
};

// 2^x on the SFU; flushes subnormal results to zero (they are below bf16 / f16 resolution of P).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

template <typename T, int D, typename Addr>
__device__ __forceinline__ void prefill_body(const PrefillParams& p) {
    constexpr int BM = PF_BM, BN = PF_BN, LD = D + 8;  // +8 elements: conflict-free ldmatrix rows
    constexpr int CPR = D / 8;                // 16-byte chunks per row
    constexpr int RSTEP = PF_WARPS * 32 / CPR;  // rows one pass of the CTA's threads copies
    constexpr u32 TILE_BYTES = BN * LD * 2;
    constexpr u32 STAGE_BYTES = 2 * TILE_BYTES;
    // [Q: BM][LD], then 2 stages of [K: BN][LD], [V: BN][LD], then the block-table ring.
    extern __shared__ __align__(16) u16 smem[];
    const u32 sq = smem_addr(smem);
    const u32 skv = sq + BM * LD * 2;
    const u32* ring = (const u32*)(smem + (BM + 4 * BN) * LD);
    const u32 sring = smem_addr(ring);
    static_assert(CPR * RSTEP == PF_WARPS * 32 && (BN % 32 == 0) && (16 % RSTEP == 0), "copy roles");
    static_assert(2 * 8 * 4 == PF_RING_BYTES && BN / 16 <= 8, "two ring slots of 8 entries");

    const u32 h = blockIdx.x % p.n_heads, b = blockIdx.x / p.n_heads;
    const u32 qs = ((const u32*)p.q_start)[b];
    const int qlen = (int)(((const u32*)p.q_start)[b + 1] - qs);
    const int tiles = (qlen + BM - 1) / BM;
    if ((int)blockIdx.y >= tiles) return;  // uniform over the CTA
    const int tile = tiles - 1 - (int)blockIdx.y;  // the longest tiles first
    u32 ctxu = min(((const u32*)p.lens)[b], p.max_context);
    ctxu = min(ctxu, Addr::capacity(p.max_blocks));
    const int ctx = (int)ctxu;
    const int pos0 = ctx - qlen;  // position of the chunk's first query

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
    const int row0 = tile * BM + warp * 32;  // first query row (of the chunk) of this warp
    const u64 qrow = (u64)p.n_heads * D;
    const u16* qp = (const u16*)p.q + (u64)qs * qrow + (u64)h * D;
    const int kv_end = min(ctx, pos0 + (tile + 1) * BM);  // keys any row of the CTA needs
    const int warp_last = pos0 + row0 + 31;                // last position of this warp
    const u32 kvh = h / p.group;
    const Addr addr((const u32*)p.index, p.outer_stride, p.token_stride, b, p.max_blocks);
    const u16* kb = (const u16*)p.k + (u64)kvh * p.head_stride;
    const u16* vb = (const u16*)p.v + (u64)kvh * p.head_stride;

    // Copy roles: this thread copies 16-byte chunk cc of rows rr, rr + RSTEP, ...
    const int cc = tid % CPR, rr = tid / CPR;
#pragma unroll
    for (int i = 0; i < BM / RSTEP; ++i) {
        const int qi = tile * BM + rr + i * RSTEP;
        const bool ok = qi < qlen;
        cp_async16(sq + ((rr + i * RSTEP) * LD + cc * 8) * 2,
                      qp + (ok ? (u64)qi * qrow + cc * 8 : 0), ok);
    }
    // Copy key tile `t` (keys n0 = t · BN ..) into stage t % 2, and the block-table entries of
    // tile t + 1 into ring slot (t + 1) % 2; the entries of tile t must have landed.
    using TR = TileRows<Addr>;
    auto load_tile = [&](int t) {
        const int n0 = t * BN;
        const u32 dst = skv + (t & 1) * STAGE_BYTES + (rr * LD + cc * 8) * 2;
        const u32* ent = ring + (t & 1) * 8;
#pragma unroll
        for (int i = 0; i < BN / RSTEP; ++i) {
            const int tok = n0 + rr + i * RSTEP;
            const bool ok = tok < kv_end;
            // The ring's entries are always readable (zero-filled past the end): the offset is
            // computed unconditionally, only the source pointer depends on `ok`.
            const u64 row = TR::row(addr, ent, n0, rr, i * RSTEP) + cc * 8;
            const u64 off = ok ? row : 0;
            cp_async16(dst + i * RSTEP * LD * 2, kb + off, ok);
            cp_async16(dst + TILE_BYTES + i * RSTEP * LD * 2, vb + off, ok);
        }
        TR::fetch(addr, sring + ((t + 1) & 1) * 32, n0 + BN, kv_end, tid);
        cp_async_commit();
    };
    // Tile 0's entries first (with Q), then tile 0 itself.
    TR::fetch(addr, sring, 0, kv_end, tid);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    if (kv_end > 0) load_tile(0);

    // ldmatrix lane addresses. A (Q): row lane % 16, column 8 · (lane / 16) of each 16 x 16 block.
    // B (K, V): matrix mi = lane / 8, row lr = lane % 8.
    const int mi = lane / 8, lr = lane % 8;
    const u32 q_ld = sq + ((warp * 32 + lane % 16) * LD + (lane / 16) * 8) * 2;
    const u32 k_ld = skv + (((mi / 2) * 8 + lr) * LD + (mi % 2) * 8) * 2;
    const u32 v_ld = skv + TILE_BYTES + (((mi % 2) * 8 + lr) * LD + (mi / 2) * 8) * 2;

    float o[2][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][j][e] = 0.f;
    // Exponent offset of each row (raw score units, before the scale) and this thread's part of
    // the row sum, for rows g and g + 8 of m-tile mt.
    float m[2][2] = {{NEG_INF, NEG_INF}, {NEG_INF, NEG_INF}}, l[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
    const float sc = p.scale_log2;

    // One key tile of this warp's 32 rows. Both call sites pass a constant MASKED (tiles crossing
    // the warp's diagonal or the context end) and the step is inlined at each, so the copy for the
    // other tiles carries no mask arithmetic.
    auto tile_step = [&](const bool MASKED, u32 so, int n0) {
        float s[2][BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int j = 0; j < BN / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][j][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 qa[2][4];
            ldsm4(qa[0], q_ld + kk * 32);
            ldsm4(qa[1], q_ld + 16 * LD * 2 + kk * 32);
#pragma unroll
            for (int j = 0; j < BN / 8; j += 2) {
                u32 kf[4];  // b0, b1 of n-tile j, then of n-tile j + 1
                ldsm4(kf, k_ld + so + (j * 8 * LD + kk * 16) * 2);
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    Mma<T>::run(s[mt][j], qa[mt], kf[0], kf[1]);
                    Mma<T>::run(s[mt][j + 1], qa[mt], kf[2], kf[3]);
                }
            }
        }
        // Row maxima of the tile (each row lives in the 4 lanes of one quad), masked first.
        float mx[2][2];
        bool grow = false;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int pos_row = pos0 + row0 + mt * 16 + g + 8 * r;
                float t[BN / 8];  // a tree, not a chain: short dependencies with 2 warps a scheduler
#pragma unroll
                for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        if (MASKED) {
                            const int col = n0 + j * 8 + 2 * t4 + e;
                            if (col > pos_row || col >= kv_end) s[mt][j][2 * r + e] = NEG_INF;
                        }
                    }
                    t[j] = fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]);
                }
#pragma unroll
                for (int w = BN / 16; w >= 1; w /= 2)
#pragma unroll
                    for (int j = 0; j < w; ++j) t[j] = fmaxf(t[j], t[j + w]);
                float x = t[0];
                x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
                x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
                mx[mt][r] = x;
                grow |= x * sc > fmaf(m[mt][r], sc, RESCALE_LOG2);
            }
        }
        // Conditional rescaling (FlashAttention-4): the offsets move, and O and the sums are
        // rescaled, only when some row of the warp has outgrown its offset by more than
        // 2^RESCALE_LOG2; otherwise P may reach 2^8, which f32 sums and bf16 / f16 P carry
        // at the same relative precision. The first tile always moves them (from −∞).
        if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const float m_new = fmaxf(m[mt][r], mx[mt][r]);
                    const float ms = m_new == NEG_INF ? 0.f : m_new * sc;
                    const float corr = ex2(fmaf(m[mt][r], sc, -ms));  // 0 from −∞
                    m[mt][r] = m_new;
                    l[mt][r] *= corr;
#pragma unroll
                    for (int j = 0; j < D / 8; ++j) {
                        o[mt][j][2 * r] *= corr;
                        o[mt][j][2 * r + 1] *= corr;
                    }
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                // A row with no key yet keeps offset 0 (its P is all zero).
                const float ms = m[mt][r] == NEG_INF ? 0.f : m[mt][r] * sc;
                float t[BN / 8];
#pragma unroll
                for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        s[mt][j][2 * r + e] = ex2(fmaf(s[mt][j][2 * r + e], sc, -ms));
                    t[j] = s[mt][j][2 * r] + s[mt][j][2 * r + 1];
                }
#pragma unroll
                for (int w = BN / 16; w >= 1; w /= 2)
#pragma unroll
                    for (int j = 0; j < w; ++j) t[j] += t[j + w];
                l[mt][r] += t[0];
            }
        }
        // O += P · V: P from the S accumulators (C layout = A layout), V through ldmatrix.trans.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            u32 a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int j = 0; j < D / 8; j += 2) {
                u32 vf[4];  // b0, b1 of d-tile j, then of d-tile j + 1
                ldsm4t(vf, v_ld + so + (kk * 16 * LD + j * 8) * 2);
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    Mma<T>::run(o[mt][j], a[mt], vf[0], vf[1]);
                    Mma<T>::run(o[mt][j + 1], a[mt], vf[2], vf[3]);
                }
            }
        }
    };

    // One barrier a tile: after it, tile `it` (and the entries of tile it + 1) have landed for
    // every thread, and every warp is done with tile it − 1, whose stage the next copy reuses.
    int it = 0;
    for (int n0 = 0; n0 < kv_end; n0 += BN, ++it) {
        cp_async_wait_all();
        __syncthreads();
        if (n0 + BN < kv_end) load_tile(it + 1);
        const u32 so = (it & 1) * STAGE_BYTES;
        if (n0 + BN - 1 > pos0 + row0 || n0 + BN > kv_end) {
            if (n0 <= warp_last) tile_step(true, so, n0);
        } else {
            tile_step(false, so, n0);
        }
    }
    cp_async_wait_all();  // nothing may be in flight into shared memory at exit

    u16* op = (u16*)p.out + (u64)qs * qrow + (u64)h * D;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float L = l[mt][r];
            L += __shfl_xor_sync(0xffffffffu, L, 1);
            L += __shfl_xor_sync(0xffffffffu, L, 2);
            const float inv = L > 0.f ? 1.f / L : 0.f;
            const int i = row0 + mt * 16 + g + 8 * r;
            if (i < qlen) {
#pragma unroll
                for (int j = 0; j < D / 8; ++j)
                    *(u32*)(op + (u64)i * qrow + j * 8 + 2 * t4) =
                        pack2<T>(o[mt][j][2 * r] * inv, o[mt][j][2 * r + 1] * inv);
            }
        }
    }
}

#define PREFILL(TN, T, D, AN, A)                                                        \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * 32, 2)                      \
        prefill_##TN##_d##D##_##AN(const PrefillParams p) {                             \
        prefill_body<T, D, A>(p);                                                       \
    }
#define PREFILL_A(TN, T, D)                \
    PREFILL(TN, T, D, strided, Strided)    \
    PREFILL(TN, T, D, paged16, Paged<16>)  \
    PREFILL(TN, T, D, paged32, Paged<32>)

PREFILL_A(bf16, Bf16, 64)
PREFILL_A(bf16, Bf16, 128)
PREFILL_A(f16, F16, 64)
PREFILL_A(f16, F16, 128)

// ---- KV append -------------------------------------------------------------------------------

// One thread per 16 bytes of the new tokens' K (and the same of V); element type does not matter.
// A position of 0xffffffff marks a padding row (a CUDA graph's batch rounded up): nothing written.
template <typename Addr>
__device__ __forceinline__ void append_body(const AppendParams& p) {
    const u32 vecs = p.head_dim / 8;
    const u64 total = (u64)p.n_tokens * p.n_kv_heads * vecs;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const u32 c = i % vecs;
        const u32 h = (i / vecs) % p.n_kv_heads;
        const u32 n = i / ((u64)vecs * p.n_kv_heads);
        const u32 t = ((const u32*)p.pos)[n];
        if (t == 0xffffffffu) continue;
        const u32 b = ((const u32*)p.seq)[n];
        const Addr addr((const u32*)p.index, p.outer_stride, p.token_stride, b, p.max_blocks);
        if (t >= Addr::capacity(p.max_blocks)) continue;
        const u64 dst = addr.at(t) + (u64)h * p.head_stride + c * 8;
        const u64 src = i * 8;
        *(uint4*)((u16*)p.k + dst) = *(const uint4*)((const u16*)p.k_new + src);
        *(uint4*)((u16*)p.v + dst) = *(const uint4*)((const u16*)p.v_new + src);
    }
}

extern "C" __global__ void append_strided(const AppendParams p) { append_body<Strided>(p); }
extern "C" __global__ void append_paged16(const AppendParams p) { append_body<Paged<16>>(p); }
extern "C" __global__ void append_paged32(const AppendParams p) { append_body<Paged<32>>(p); }

// ---- test and benchmark data -----------------------------------------------------------------

// Fill n 2-byte elements with hashed values uniform in [-1, 1) (bf16 or f16), never NaN, never 0
// everywhere: benchmarks must not run on zeros.
extern "C" __global__ void fill_uniform(u64 ptr, u64 n, u32 seed, u32 is_f16) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 z = i * 0x9e3779b97f4a7c15ull + seed;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        const float f = (float)(z >> 40) * (2.0f / 16777216.0f) - 1.0f;
        ((u16*)ptr)[i] = is_f16 ? F16::from_float(f) : Bf16::from_float(f);
    }
}

// Keep the stream busy for `ns` nanoseconds: benchmarks queue their timed launches behind it, so
// that the host's launch overhead is not what the events measure.
extern "C" __global__ void spin(u64 ns) {
    u64 start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
