// vkv model kernels: the small element-wise and row-wise steps of a Llama forward pass on the
// GPU, between the cuBLAS GEMMs and the attention kernels (attention.cu): row gather (embedding,
// picking the rows that need logits), RMSNorm with the residual add fused in, RoPE fused with the
// split of the QKV product into Q, K and V, SiLU·mul, argmax, and a seeded fill for random
// weights. bf16 activations, f32 residual stream and f32 arithmetic (as the CPU reference).
//
// No CUDA headers (NVRTC then needs no include path): bf16 is a bit pattern converted by shifts,
// rounding to nearest even as attention.cu does.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float bf(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 to_bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// out[r] = table[idx[r]] for `rows` rows of `dim` bf16 elements; written as f32 when out_f32.
// Indices at or past `n_rows` write NaN (the host checks them first; this makes a slip visible).
extern "C" __global__ void gather_rows(const u16* table, const u32* idx, void* out, u32 rows,
                                       u32 dim, u32 n_rows, u32 out_f32) {
    const u32 r = blockIdx.x;
    if (r >= rows) return;
    const u32 src = idx[r];
    for (u32 j = threadIdx.x; j < dim; j += blockDim.x) {
        float v = src < n_rows ? bf(table[(u64)src * dim + j]) : __int_as_float(0x7fc00000);
        if (out_f32) ((float*)out)[(u64)r * dim + j] = v;
        else ((u16*)out)[(u64)r * dim + j] = to_bf(v);
    }
}

__device__ __forceinline__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    const u32 warps = (blockDim.x + 31) / 32;
    float t = 0.f;
    for (u32 w = 0; w < warps; ++w) t += shared[w];
    __syncthreads();
    return t;
}

// Per row r: x[r] += delta[r] (bf16, skipped when delta is null); out[r] = bf16(x[r] / rms · w).
// One CTA per row.
extern "C" __global__ void add_rms_norm(float* x, const u16* delta, const float* w, u16* out,
                                        u32 dim, float eps) {
    __shared__ float shared[32];
    const u64 base = (u64)blockIdx.x * dim;
    float ss = 0.f;
    for (u32 j = threadIdx.x; j < dim; j += blockDim.x) {
        float v = x[base + j];
        if (delta) {
            v += bf(delta[base + j]);
            x[base + j] = v;
        }
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, shared) / dim + eps);
    for (u32 j = threadIdx.x; j < dim; j += blockDim.x)
        out[base + j] = to_bf(x[base + j] * inv * w[j]);
}

// Split qkv ([rows][(nh + 2·nkv)·hd], the fused projection) into q [rows][nh][hd], k and v
// [rows][nkv][hd], rotating q and k by each row's position. style 0: pairs (2i, 2i+1)
// (interleaved, GGUF); 1: pairs (i, i + hd/2) (HF rotate_half). One CTA per row, one thread per
// pair (or per v element).
extern "C" __global__ void rope_split(const u16* qkv, u16* q, u16* k, u16* v, const u32* pos,
                                      const float* inv_freq, u32 nh, u32 nkv, u32 hd, u32 style) {
    const u32 r = blockIdx.x;
    const u32 half = hd / 2;
    const u32 width = (nh + 2 * nkv) * hd;
    const u16* src = qkv + (u64)r * width;
    const float p = (float)pos[r];
    for (u32 i = threadIdx.x; i < (nh + nkv) * half; i += blockDim.x) {
        const u32 head = i / half, f = i % half;
        const u32 a = style == 0 ? 2 * f : f;
        const u32 b = style == 0 ? 2 * f + 1 : f + half;
        float s, c;
        sincosf(p * inv_freq[f], &s, &c);
        const u16* h = src + (u64)head * hd;
        const float x0 = bf(h[a]), x1 = bf(h[b]);
        u16* dst = head < nh ? q + ((u64)r * nh + head) * hd
                             : k + ((u64)r * nkv + (head - nh)) * hd;
        dst[a] = to_bf(x0 * c - x1 * s);
        dst[b] = to_bf(x0 * s + x1 * c);
    }
    for (u32 i = threadIdx.x; i < nkv * hd; i += blockDim.x)
        v[(u64)r * nkv * hd + i] = src[(u64)(nh + nkv) * hd + i];
}

// out[r][j] = silu(gu[r][j]) · gu[r][inter + j]  (gu is the fused gate/up product).
extern "C" __global__ void silu_mul(const u16* gu, u16* out, u32 rows, u32 inter) {
    const u64 n = (u64)rows * inter;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / inter, j = i % inter;
        const float g = bf(gu[r * 2 * inter + j]), u = bf(gu[r * 2 * inter + inter + j]);
        out[i] = to_bf(g / (1.f + __expf(-g)) * u);
    }
}

// out[r] = the index of the largest of logits[r][0..n] (the lowest index on ties; NaN never
// wins). One CTA per row.
extern "C" __global__ void argmax_rows(const float* logits, u32* out, u32 n) {
    __shared__ float sv[32];
    __shared__ u32 si[32];
    const float* row = logits + (u64)blockIdx.x * n;
    float best = -__int_as_float(0x7f800000);
    u32 bi = 0xffffffffu;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) {
        const float v = row[j];
        if (v > best || (bi == 0xffffffffu && v == v)) { best = v; bi = j; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const u32 oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) { sv[warp] = best; si[warp] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (u32 w = 1; w < (blockDim.x + 31) / 32; ++w)
            if (sv[w] > best || (sv[w] == best && si[w] < bi)) { best = sv[w]; bi = si[w]; }
        out[blockIdx.x] = bi == 0xffffffffu ? 0 : bi;
    }
}

// n bf16 values uniform in [-scale, scale), hashed from (seed, index): random weights made on the
// device (a benchmark's 16 GB of weights never cross PCIe). never all zero.
extern "C" __global__ void fill_bf16(u16* ptr, u64 n, u64 seed, float scale) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 z = i * 0x9e3779b97f4a7c15ull + seed * 0xd1b54a32d192ed03ull + 1;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        ptr[i] = to_bf(((float)(z >> 40) * (2.0f / 16777216.0f) - 1.0f) * scale);
    }
}
