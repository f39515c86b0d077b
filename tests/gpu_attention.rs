//! The CUDA attention kernels against the CPU reference (`vkv_kernels::cpu::attention`), on a GPU.
//!
//! Every decode and prefill kernel × addressing mode (plain strided tensor, a `KvSpace` on
//! `CudaVmm` with real 2 MiB pages in both layouts, paged with blocks of 16 and 32 scattered at
//! random) × dtype (bf16, f16) × head dim (64, 128), with GQA ratios 1, 2, 4, 6 and 16, ragged
//! context lengths that cross page and block boundaries, decode split counts 1, automatic and 5,
//! and prefill over ragged chunks (whole short prompts, and chunks at the end of long cached
//! prefixes). The KV is written by the append kernel (checked bit for bit by reading the memory
//! back), outputs are poisoned with NaN before each launch, inputs are fresh random numbers each
//! run (seed printed; `VKV_SEED` repeats one), and each sequence's output must be within 1e-2
//! relative error (L2) of the f32 reference, NaN-free.
//!
//! `VKV_ATTENTION_SMALL=1` keeps only contexts up to 1100 tokens (for `compute-sanitizer`).
//!
//! Skips (printing why) without a GPU; fails instead when `VKV_REQUIRE_GPU=1` (see ../shared/GPU.md).
#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;

use common::gpu;
use vkv_kernels::cpu::{attention, Heads, KvDtype, KvRef};
use vkv_kernels::cuda::{
    compile_module_in, AppendArgs, Attention, CacheOutcome, DecodeArgs, DecodeShape,
    DecodeWorkspace, DeviceBuffer, Dtype, KernelError, KvAddress, PrefillArgs, PrefillShape,
};
use vkv_kernels::half::{bf16, f16};
use vkv_vmm::{CudaVmm, KvLayout, KvSpace, KvSpaceConfig, PhysicalMemory};

const PAGE: usize = 2 << 20;

/// splitmix64: small, seedable, good enough for test data.
struct Rng(u64);
impl Rng {
    fn from_env() -> Self {
        let seed = std::env::var("VKV_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("seed {seed} (VKV_SEED={seed} repeats this run)");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

fn to_bits(dtype: Dtype, x: f32) -> u16 {
    match dtype {
        Dtype::Bf16 => bf16::from_f32(x).to_bits(),
        Dtype::F16 => f16::from_f32(x).to_bits(),
    }
}

fn from_bits(dtype: Dtype, b: u16) -> f32 {
    match dtype {
        Dtype::Bf16 => bf16::from_bits(b).to_f32(),
        Dtype::F16 => f16::from_bits(b).to_f32(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Plain,
    Vmm(KvLayout),
    Paged(u32),
}

/// Random values rounded to the dtype: bits for the device, f32 for the reference.
fn random_values(rng: &mut Rng, dtype: Dtype, n: usize, amp: f32) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = (0..n)
        .map(|_| to_bits(dtype, rng.uniform(-amp, amp)))
        .collect();
    let vals = bits.iter().map(|&b| from_bits(dtype, b)).collect();
    (bits, vals)
}

/// Reads bytes at a device address, whatever backs it.
type Reader = Box<dyn Fn(u64, &mut [u8])>;
/// Device addresses of sequence `b`'s token `t`, head 0 (K and V).
type Locator = Box<dyn Fn(usize, usize) -> (u64, u64)>;
/// One sequence's K and V: dtype bits for the device and their f32 values for the reference.
type HostKv = ((Vec<u16>, Vec<f32>), (Vec<u16>, Vec<f32>));

/// Where the KV of a case lives, with whatever keeps that memory alive.
struct Placement {
    kv: KvAddress,
    _bufs: Vec<DeviceBuffer>,
    _space: Option<KvSpace>,
    /// Device address of sequence `b`'s token `t`, head 0 (K and V).
    addr_of: Locator,
    /// Read `bytes` at a device address (any backing).
    read: Reader,
}

#[allow(clippy::too_many_arguments)]
fn place(
    vmm: &Arc<CudaVmm>,
    rng: &mut Rng,
    mode: Mode,
    lens: &[usize],
    n_kv: usize,
    d: usize,
) -> Placement {
    let ctx = vmm.context();
    let b = lens.len();
    let max_len = *lens.iter().max().unwrap();
    let row = n_kv * d; // elements per token per K or V
    let read_plain = {
        let ctx = ctx.clone();
        Box::new(move |addr: u64, out: &mut [u8]| {
            ctx.bind_to_thread().unwrap();
            unsafe {
                vkv_kernels::cuda::cudarc::driver::result::memcpy_dtoh_sync(out, addr).unwrap()
            }
        }) as Reader
    };
    match mode {
        Mode::Plain => {
            // [slot][token][head][d], slots in a random order, one spare slot, token stride
            // padded so rows are not tightly packed.
            let token_stride = row + 8;
            let slot_stride = (max_len + 3) * token_stride;
            let total = (b + 1) * slot_stride * 2;
            let k = DeviceBuffer::new(ctx, total).unwrap();
            let v = DeviceBuffer::new(ctx, total).unwrap();
            k.fill_bytes(0xA5).unwrap();
            v.fill_bytes(0x5A).unwrap();
            let mut slots: Vec<u32> = (0..=b as u32).collect();
            rng.shuffle(&mut slots);
            slots.truncate(b);
            let sl = DeviceBuffer::from_slice(ctx, &slots).unwrap();
            let (kp, vp) = (k.ptr(), v.ptr());
            let kv = KvAddress::Strided {
                k: kp,
                v: vp,
                slots: sl.ptr(),
                slot_stride: slot_stride as u64,
                token_stride: token_stride as u64,
                head_stride: d as u64,
            };
            Placement {
                kv,
                _bufs: vec![k, v, sl],
                _space: None,
                addr_of: Box::new(move |s, t| {
                    let off = ((slots[s] as usize * slot_stride + t * token_stride) * 2) as u64;
                    (kp + off, vp + off)
                }),
                read: read_plain,
            }
        }
        Mode::Vmm(layout) => {
            let mut config = KvSpaceConfig {
                layout,
                num_layers: 3,
                num_kv_heads: n_kv,
                head_dim: d,
                dtype_bytes: 2,
                max_slots: b + 2,
                max_tokens: max_len + 5,
                page_size: PAGE,
                max_pages: 0,
            };
            config.max_pages = config.num_regions() * (b + 2) * config.pages_for(max_len + 5);
            let mut space = KvSpace::new(config, vmm.clone()).unwrap();
            // Skip a slot so slot ids differ from batch rows.
            let spare = space.acquire().unwrap();
            let mut slots = Vec::new();
            for &len in lens {
                let s = space.acquire().unwrap();
                space.ensure(s, len).unwrap();
                slots.push(s.0 as u32);
            }
            space.release(spare).unwrap();
            let view = space.layer_view(1);
            let sl = DeviceBuffer::from_slice(ctx, &slots).unwrap();
            let kv = KvAddress::Strided {
                k: view.k,
                v: view.v,
                slots: sl.ptr(),
                slot_stride: view.slot_stride as u64,
                token_stride: view.token_stride as u64,
                head_stride: view.head_stride as u64,
            };
            let vm = vmm.clone();
            Placement {
                kv,
                _bufs: vec![sl],
                _space: Some(space),
                addr_of: Box::new(move |s, t| {
                    let off =
                        ((slots[s] as usize * view.slot_stride + t * view.token_stride) * 2) as u64;
                    (view.k + off, view.v + off)
                }),
                read: Box::new(move |addr, out| unsafe { vm.read(addr, out).unwrap() }),
            }
        }
        Mode::Paged(bs) => {
            let bs = bs as usize;
            let need: usize = lens.iter().map(|l| l.div_ceil(bs)).sum();
            let n_blocks = need + 7;
            let max_blocks = max_len.div_ceil(bs) + 1;
            let block_stride = bs * row;
            let k = DeviceBuffer::new(ctx, n_blocks * block_stride * 2).unwrap();
            let v = DeviceBuffer::new(ctx, n_blocks * block_stride * 2).unwrap();
            k.fill_bytes(0xA5).unwrap();
            v.fill_bytes(0x5A).unwrap();
            let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
            rng.shuffle(&mut ids);
            // Unused entries point far outside the pool: reading one is a fault, not a quiet error.
            let mut table = vec![u32::MAX; b * max_blocks];
            let mut next = 0;
            for (s, &len) in lens.iter().enumerate() {
                for j in 0..len.div_ceil(bs) {
                    table[s * max_blocks + j] = ids[next];
                    next += 1;
                }
            }
            let tb = DeviceBuffer::from_slice(ctx, &table).unwrap();
            let (kp, vp) = (k.ptr(), v.ptr());
            let kv = KvAddress::Paged {
                k: kp,
                v: vp,
                block_table: tb.ptr(),
                max_blocks: max_blocks as u32,
                block_size: bs as u32,
                block_stride: block_stride as u64,
                token_stride: row as u64,
                head_stride: d as u64,
            };
            Placement {
                kv,
                _bufs: vec![k, v, tb],
                _space: None,
                addr_of: Box::new(move |s, t| {
                    let blk = table[s * max_blocks + t / bs] as usize;
                    let off = ((blk * block_stride + (t % bs) * row) * 2) as u64;
                    (kp + off, vp + off)
                }),
                read: read_plain,
            }
        }
    }
}

struct Case {
    dtype: Dtype,
    head_dim: usize,
    n_heads: usize,
    n_kv: usize,
    mode: Mode,
    lens: Vec<usize>,
}

/// Run one case: append all tokens (in two launches, shuffled), check the written bytes, decode
/// with several split counts, compare with the CPU reference. Returns the worst relative error.
fn run_case(vmm: &Arc<CudaVmm>, att: &Attention, rng: &mut Rng, c: &Case) -> f32 {
    let ctx = vmm.context();
    let stream = ctx.default_stream();
    let (b, d, hq, hk) = (c.lens.len(), c.head_dim, c.n_heads, c.n_kv);
    let row = hk * d;
    let p = place(vmm, rng, c.mode, &c.lens, hk, d);

    // Host KV per sequence: [len][hk][d], rounded to the dtype.
    let kv_host: Vec<HostKv> = c
        .lens
        .iter()
        .map(|&l| {
            (
                random_values(rng, c.dtype, l * row, 1.0),
                random_values(rng, c.dtype, l * row, 1.0),
            )
        })
        .collect();
    let mut tokens: Vec<(usize, usize)> = c
        .lens
        .iter()
        .enumerate()
        .flat_map(|(s, &l)| (0..l).map(move |t| (s, t)))
        .collect();
    rng.shuffle(&mut tokens);
    let half = tokens.len() / 2;
    for chunk in [&tokens[..half], &tokens[half..]] {
        if chunk.is_empty() {
            continue;
        }
        let mut kn = Vec::with_capacity(chunk.len() * row);
        let mut vn = Vec::with_capacity(chunk.len() * row);
        for &(s, t) in chunk {
            kn.extend_from_slice(&kv_host[s].0 .0[t * row..(t + 1) * row]);
            vn.extend_from_slice(&kv_host[s].1 .0[t * row..(t + 1) * row]);
        }
        let seq: Vec<u32> = chunk.iter().map(|&(s, _)| s as u32).collect();
        let pos: Vec<u32> = chunk.iter().map(|&(_, t)| t as u32).collect();
        let bufs = [
            DeviceBuffer::from_slice(ctx, &kn).unwrap(),
            DeviceBuffer::from_slice(ctx, &vn).unwrap(),
            DeviceBuffer::from_slice(ctx, &seq).unwrap(),
            DeviceBuffer::from_slice(ctx, &pos).unwrap(),
        ];
        let args = AppendArgs {
            k_new: bufs[0].ptr(),
            v_new: bufs[1].ptr(),
            seq: bufs[2].ptr(),
            pos: bufs[3].ptr(),
            n_tokens: chunk.len(),
        };
        unsafe { att.append(&stream, &args, &p.kv, hk, d) }.expect("append launch");
        stream.synchronize().expect("append ran");
    }
    // The append wrote exactly the right bytes: check a sample of tokens (all of short sequences).
    for (s, &l) in c.lens.iter().enumerate() {
        let step = (l / 64).max(1);
        for t in (0..l).step_by(step).chain([l - 1]) {
            let (ka, va) = (p.addr_of)(s, t);
            for (addr, want) in [(ka, &kv_host[s].0 .0), (va, &kv_host[s].1 .0)] {
                for h in 0..hk {
                    let mut got = vec![0u8; d * 2];
                    (p.read)(addr + (h * d * 2) as u64, &mut got);
                    let got: Vec<u16> = got
                        .chunks_exact(2)
                        .map(|x| u16::from_le_bytes([x[0], x[1]]))
                        .collect();
                    let head_stride_ok = match p.kv {
                        KvAddress::Strided { head_stride, .. }
                        | KvAddress::Paged { head_stride, .. } => head_stride as usize == d,
                    };
                    assert!(head_stride_ok);
                    assert_eq!(
                        got,
                        want[t * row + h * d..t * row + (h + 1) * d],
                        "append: seq {s} token {t} head {h} in {:?}",
                        c.mode
                    );
                }
            }
        }
    }

    // Queries, reference.
    let (q_bits, q) = random_values(rng, c.dtype, b * hq * d, 2.0);
    let scale = 1.0 / (d as f32).sqrt();
    let heads = Heads {
        n_heads: hq,
        n_kv_heads: hk,
        head_dim: d,
    };
    let mut reference = vec![0f32; b * hq * d];
    for (s, &l) in c.lens.iter().enumerate() {
        let (mut k, mut v) = (kv_host[s].0 .1.clone(), kv_host[s].1 .1.clone());
        let kr = KvRef::Strided {
            k: k.as_mut_ptr().cast(),
            v: v.as_mut_ptr().cast(),
            dtype: KvDtype::F32,
            token_stride: row,
            head_stride: d,
        };
        let range = s * hq * d..(s + 1) * hq * d;
        unsafe {
            attention(
                &q[range.clone()],
                &kr,
                l,
                heads,
                scale,
                &mut reference[range],
            )
        };
    }

    let max_context = *c.lens.iter().max().unwrap();
    let shape = DecodeShape {
        batch: b,
        n_heads: hq,
        n_kv_heads: hk,
        head_dim: d,
        max_context,
    };
    let qd = DeviceBuffer::from_slice(ctx, &q_bits).unwrap();
    let out = DeviceBuffer::new(ctx, b * hq * d * 2).unwrap();
    let lens: Vec<u32> = c.lens.iter().map(|&l| l as u32).collect();
    let lens_d = DeviceBuffer::from_slice(ctx, &lens).unwrap();
    let ws = DecodeWorkspace::new(ctx, b * hq, d, 64).unwrap();
    let args = DecodeArgs {
        q: qd.ptr(),
        out: out.ptr(),
        lens: lens_d.ptr(),
    };
    let mut worst = 0f32;
    for splits in [Some(1), None, Some(5)] {
        out.fill_bytes(0xFF).unwrap(); // NaN in bf16 and f16
        let plan = unsafe {
            att.decode(
                &stream,
                c.dtype,
                &shape,
                &args,
                &p.kv,
                scale,
                splits,
                Some(&ws),
            )
        }
        .expect("decode launch");
        stream.synchronize().expect("decode ran");
        let mut got = vec![0u16; b * hq * d];
        out.download(0, &mut got).unwrap();
        for (s, &l) in c.lens.iter().enumerate() {
            let range = s * hq * d..(s + 1) * hq * d;
            let (mut num, mut den) = (0f64, 0f64);
            for i in range {
                let g = from_bits(c.dtype, got[i]);
                assert!(
                    g.is_finite(),
                    "{:?} {:?} d{d} {hq}/{hk}: NaN/inf at seq {s} (len {l}) elem {i}, plan {plan:?}",
                    c.dtype,
                    c.mode
                );
                num += ((g - reference[i]) as f64).powi(2);
                den += (reference[i] as f64).powi(2);
            }
            let rel = (num / den.max(1e-30)).sqrt() as f32;
            worst = worst.max(rel);
            assert!(
                rel <= 1e-2,
                "{:?} {:?} d{d} {hq}/{hk}: seq {s} (len {l}) relative error {rel}, plan {plan:?}",
                c.dtype,
                c.mode
            );
        }
    }
    let prefill_worst = check_prefill(vmm, att, rng, c, &p, &kv_host, scale, heads);
    worst.max(prefill_worst)
}

/// Prefill: each sequence's last `q_len` tokens are a chunk whose prefix is cached; compare every
/// query row with the CPU reference over positions `0 ..= its own`.
#[allow(clippy::too_many_arguments)]
fn check_prefill(
    vmm: &Arc<CudaVmm>,
    att: &Attention,
    rng: &mut Rng,
    c: &Case,
    p: &Placement,
    kv_host: &[HostKv],
    scale: f32,
    heads: Heads,
) -> f32 {
    let ctx = vmm.context();
    let stream = ctx.default_stream();
    let (b, d, hq, hk) = (c.lens.len(), c.head_dim, c.n_heads, c.n_kv);
    let row = hk * d;
    // Chunk lengths: whole prompts for short sequences, 1..=cap otherwise (the CPU reference
    // costs q_len × context); up to 300 rows cover 1, 2 and 3 of the kernel's 128-row tiles.
    let q_lens: Vec<usize> = c
        .lens
        .iter()
        .map(|&l| match l {
            0..=150 => l,
            151..=2000 => 1 + rng.below(300.min(l)),
            _ => 1 + rng.below(40),
        })
        .collect();
    let mut q_start = vec![0u32];
    for &n in &q_lens {
        q_start.push(q_start.last().unwrap() + n as u32);
    }
    let total = *q_start.last().unwrap() as usize;
    let (q_bits, q) = random_values(rng, c.dtype, total * hq * d, 2.0);
    // Reference, one thread per sequence.
    let mut reference = vec![0f32; total * hq * d];
    std::thread::scope(|scope| {
        let mut rest = reference.as_mut_slice();
        for s in 0..b {
            let (mine, tail) = rest.split_at_mut(q_lens[s] * hq * d);
            rest = tail;
            let (q, kvh, l, n, q0) = (&q, &kv_host[s], c.lens[s], q_lens[s], q_start[s] as usize);
            scope.spawn(move || {
                let (mut k, mut v) = (kvh.0 .1.clone(), kvh.1 .1.clone());
                let kr = KvRef::Strided {
                    k: k.as_mut_ptr().cast(),
                    v: v.as_mut_ptr().cast(),
                    dtype: KvDtype::F32,
                    token_stride: row,
                    head_stride: d,
                };
                for i in 0..n {
                    let pos = l - n + i;
                    let qr = &q[(q0 + i) * hq * d..(q0 + i + 1) * hq * d];
                    let out = &mut mine[i * hq * d..(i + 1) * hq * d];
                    unsafe { attention(qr, &kr, pos + 1, heads, scale, out) };
                }
            });
        }
    });
    let shape = PrefillShape {
        batch: b,
        n_heads: hq,
        n_kv_heads: hk,
        head_dim: d,
        max_q_len: *q_lens.iter().max().unwrap(),
        max_context: *c.lens.iter().max().unwrap(),
    };
    let qd = DeviceBuffer::from_slice(ctx, &q_bits).unwrap();
    let out = DeviceBuffer::new(ctx, total * hq * d * 2).unwrap();
    out.fill_bytes(0xFF).unwrap();
    let qs = DeviceBuffer::from_slice(ctx, &q_start).unwrap();
    let lens: Vec<u32> = c.lens.iter().map(|&l| l as u32).collect();
    let lens_d = DeviceBuffer::from_slice(ctx, &lens).unwrap();
    let args = PrefillArgs {
        q: qd.ptr(),
        out: out.ptr(),
        q_start: qs.ptr(),
        lens: lens_d.ptr(),
    };
    unsafe { att.prefill(&stream, c.dtype, &shape, &args, &p.kv, scale) }.expect("prefill launch");
    stream.synchronize().expect("prefill ran");
    let mut got = vec![0u16; total * hq * d];
    out.download(0, &mut got).unwrap();
    let mut worst = 0f32;
    for s in 0..b {
        let range = q_start[s] as usize * hq * d..q_start[s + 1] as usize * hq * d;
        let (mut num, mut den) = (0f64, 0f64);
        for i in range {
            let g = from_bits(c.dtype, got[i]);
            assert!(
                g.is_finite(),
                "prefill {:?} {:?} d{d} {hq}/{hk}: NaN/inf at seq {s} (len {}, chunk {}) elem {i}",
                c.dtype,
                c.mode,
                c.lens[s],
                q_lens[s]
            );
            num += ((g - reference[i]) as f64).powi(2);
            den += (reference[i] as f64).powi(2);
        }
        let rel = (num / den.max(1e-30)).sqrt() as f32;
        worst = worst.max(rel);
        assert!(
            rel <= 1e-2,
            "prefill {:?} {:?} d{d} {hq}/{hk}: seq {s} (len {}, chunk {}) relative error {rel}",
            c.dtype,
            c.mode,
            c.lens[s],
            q_lens[s]
        );
    }
    worst
}

/// `VKV_ATTENTION_SMALL=1`: contexts of at most 1100 tokens (for compute-sanitizer runs).
fn small() -> bool {
    std::env::var("VKV_ATTENTION_SMALL").as_deref() == Ok("1")
}

fn cases(rng: &mut Rng, modes: &[Mode]) -> Vec<Case> {
    let heads = [(32, 8), (8, 8), (12, 2), (32, 2), (6, 3)];
    let mut out = Vec::new();
    let mut i = 0;
    for &mode in modes {
        for dtype in [Dtype::Bf16, Dtype::F16] {
            for head_dim in [64, 128] {
                let (n_heads, n_kv) = heads[i % heads.len()];
                i += 1;
                let row_bytes = n_kv * head_dim * 2;
                // Lengths that end just before, on and after the boundaries of this mode, plus
                // random ones.
                let mut lens = vec![1, 15, 16, 17, 33, 100];
                match mode {
                    Mode::Paged(bs) => lens.extend([bs as usize * 7 - 1, bs as usize * 40 + 1]),
                    Mode::Plain => lens.extend([500, 1031]),
                    Mode::Vmm(KvLayout::PerLayer) => {
                        let per_page = PAGE / row_bytes;
                        lens.extend([per_page - 1, per_page + 1, per_page * 2 + 3]);
                    }
                    Mode::Vmm(KvLayout::TokenMajor) => {
                        let per_page = PAGE / (2 * 3 * row_bytes);
                        lens.extend([per_page - 1, per_page + 1, per_page * 5 + 3]);
                    }
                }
                for _ in 0..2 {
                    lens.push(1 + rng.below(3000));
                }
                if small() {
                    lens.retain(|&l| l <= 1100);
                }
                rng.shuffle(&mut lens);
                out.push(Case {
                    dtype,
                    head_dim,
                    n_heads,
                    n_kv,
                    mode,
                    lens,
                });
            }
        }
    }
    out
}

fn run_modes(modes: &[Mode]) {
    let Some(vmm) = gpu() else { return };
    let att = Attention::new(vmm.context()).expect("attention kernels compile and load");
    eprintln!("kernels for {} ({:?})", att.arch, att.outcome);
    let mut rng = Rng::from_env();
    for c in cases(&mut rng, modes) {
        let worst = run_case(&vmm, &att, &mut rng, &c);
        eprintln!(
            "ok {:?} {:?} d{} heads {}/{} lens {:?}: worst relative error {worst:.2e}",
            c.mode, c.dtype, c.head_dim, c.n_heads, c.n_kv, c.lens
        );
    }
}

#[test]
fn gpu_decode_strided_on_a_plain_allocation_matches_the_cpu_reference() {
    run_modes(&[Mode::Plain]);
}

#[test]
fn gpu_decode_strided_on_a_cuda_vmm_kv_space_matches_the_cpu_reference() {
    run_modes(&[
        Mode::Vmm(KvLayout::PerLayer),
        Mode::Vmm(KvLayout::TokenMajor),
    ]);
}

#[test]
fn gpu_decode_paged_matches_the_cpu_reference() {
    run_modes(&[Mode::Paged(16), Mode::Paged(32)]);
}

#[test]
fn gpu_launchers_refuse_bad_shapes_with_typed_errors() {
    let Some(vmm) = gpu() else { return };
    let ctx = vmm.context();
    let att = Attention::new(ctx).unwrap();
    let stream = ctx.default_stream();
    let buf = DeviceBuffer::new(ctx, 1 << 20).unwrap();
    let p = buf.ptr();
    let kv = KvAddress::Strided {
        k: p,
        v: p,
        slots: p,
        slot_stride: 4096,
        token_stride: 128,
        head_stride: 64,
    };
    let shape = DecodeShape {
        batch: 1,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        max_context: 8,
    };
    let args = DecodeArgs {
        q: p,
        out: p,
        lens: p,
    };
    let decode = |shape: &DecodeShape, kv: &KvAddress, splits| unsafe {
        att.decode(&stream, Dtype::Bf16, shape, &args, kv, 0.1, splits, None)
    };
    let bad_dim = DecodeShape {
        head_dim: 96,
        ..shape
    };
    assert!(matches!(
        decode(&bad_dim, &kv, None),
        Err(KernelError::Shape(_))
    ));
    let bad_ratio = DecodeShape {
        n_heads: 5,
        ..shape
    };
    assert!(matches!(
        decode(&bad_ratio, &kv, None),
        Err(KernelError::Shape(_))
    ));
    let misaligned = KvAddress::Strided {
        k: p,
        v: p,
        slots: p,
        slot_stride: 4096,
        token_stride: 130,
        head_stride: 64,
    };
    assert!(matches!(
        decode(&shape, &misaligned, None),
        Err(KernelError::Misaligned { .. })
    ));
    let odd_pointer = KvAddress::Strided {
        k: p + 2,
        v: p,
        slots: p,
        slot_stride: 4096,
        token_stride: 128,
        head_stride: 64,
    };
    assert!(matches!(
        decode(&shape, &odd_pointer, None),
        Err(KernelError::Misaligned { .. })
    ));
    let paged8 = KvAddress::Paged {
        k: p,
        v: p,
        block_table: p,
        max_blocks: 4,
        block_size: 8,
        block_stride: 1024,
        token_stride: 128,
        head_stride: 64,
    };
    assert!(matches!(
        decode(&shape, &paged8, None),
        Err(KernelError::Shape(_))
    ));
    let long = DecodeShape {
        max_context: 4096,
        ..shape
    };
    assert!(matches!(
        decode(&long, &kv, Some(4)),
        Err(KernelError::TooSmall { .. })
    ));
    let small_ws = DecodeWorkspace::new(ctx, 1, 64, 2).unwrap();
    assert!(matches!(
        unsafe {
            att.decode(
                &stream,
                Dtype::Bf16,
                &long,
                &args,
                &kv,
                0.1,
                Some(4),
                Some(&small_ws),
            )
        },
        Err(KernelError::TooSmall { .. })
    ));
    stream.synchronize().unwrap();
}

#[test]
fn gpu_nvrtc_cache_hits_on_the_second_build_and_compile_errors_carry_the_log() {
    let Some(vmm) = gpu() else { return };
    let ctx = vmm.context();
    let dir = std::env::temp_dir().join(format!("vkv-kernel-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let src = "extern \"C\" __global__ void k(int* p) { p[threadIdx.x] = threadIdx.x; }";
    let t = std::time::Instant::now();
    let a = compile_module_in(ctx, "tiny", src, &[], Some(dir.clone())).unwrap();
    let first = t.elapsed();
    let t = std::time::Instant::now();
    let b = compile_module_in(ctx, "tiny", src, &[], Some(dir.clone())).unwrap();
    let second = t.elapsed();
    eprintln!(
        "{}: compile {first:?}, cache hit {second:?} ({:?})",
        a.arch, b.cache_file
    );
    assert_eq!(a.outcome, CacheOutcome::Compiled);
    assert_eq!(b.outcome, CacheOutcome::Hit);
    let c = compile_module_in(ctx, "tiny", src, &["-DX=1"], Some(dir.clone())).unwrap();
    assert_eq!(
        c.outcome,
        CacheOutcome::Compiled,
        "new options, new cache entry"
    );
    match compile_module_in(
        ctx,
        "broken",
        "__global__ void k( {",
        &[],
        Some(dir.clone()),
    ) {
        Err(KernelError::Compile { log, arch, .. }) => {
            assert!(!log.is_empty());
            eprintln!("{arch} compile error log: {log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
