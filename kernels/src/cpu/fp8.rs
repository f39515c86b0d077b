//! FP8 E4M3 ("e4m3fn": 1 sign, 4 exponent bits biased by 7, 3 mantissa bits, no infinities) for
//! the CPU KV cache, vLLM's `--kv-cache-dtype fp8` format (stored unscaled, as vLLM does when no
//! calibrated scales are given): finite values up to ±448, 4 significant bits, subnormals down
//! to 2⁻⁹. A cache of it reads a quarter of f32's bytes per decode step and half of f16's.
//!
//! **Encoding** goes through f16, the way the f16 cache stores a value: `h = f16(x · 2⁻⁸)`
//! (round to nearest even), whose exponent field is then e4m3's (bias 15 − 8 = 7, and f16's
//! subnormals are e4m3's), and its 10 mantissa bits are rounded to 3, nearest even, as an
//! integer (a carry moves into the exponent, as it should). Magnitudes past 448 (infinities
//! too) saturate to ±448, as vLLM's conversion does; NaN becomes `0x7F`. Rounding twice (to
//! f16, then to 3 bits) can differ from rounding once in the last place when `x` lies within
//! f16's rounding of a tie; every path here does the same steps, so they agree bit for bit.
//!
//! **Decoding** is exact and cheap: byte `b`, sign-extended to 16 bits and shifted left by 7,
//! masked with `0xBF80`, is the f16 of `value · 2⁻⁸` (sign at bit 15, exponent and mantissa
//! where f16 keeps them), so `value = f32(f16) · 256` — the kernels fold the 256 into the
//! attention scale (K) and the softmax normalisation (V). `0x7F` (NaN) reads back as 480.

use half::f16;

/// The power of two decoding leaves out: `value = f32(decode_f16(b)) · SCALE`.
pub const SCALE: f32 = 256.0;

/// The largest finite magnitude's code (448).
const MAX_CODE: u16 = 0x7E;

/// The e4m3 code of `x` (see the module docs).
pub fn encode(x: f32) -> u8 {
    code_of_f16(f16::from_f32(x * (1.0 / SCALE)).to_bits())
}

/// The e4m3 code of a value whose `f16(x · 2⁻⁸)` bits are `h`.
#[inline(always)]
fn code_of_f16(h: u16) -> u8 {
    let sign = ((h >> 8) & 0x80) as u8;
    let mag = h & 0x7FFF;
    let code = if mag > 0x7C00 {
        0x7F
    } else {
        ((mag + 0x3F + ((mag >> 7) & 1)) >> 7).min(MAX_CODE)
    };
    sign | code as u8
}

/// `value · 2⁻⁸` as f16 bits (see the module docs).
#[inline(always)]
pub fn decode_f16(b: u8) -> u16 {
    (((b as i8 as i16) << 7) as u16) & 0xBF80
}

/// The value of code `b`.
pub fn decode(b: u8) -> f32 {
    f16::from_bits(decode_f16(b)).to_f32() * SCALE
}

/// Encode `src` into `dst` (`src.len()` bytes): F16C and AVX2 where detected, else
/// [`encode`]; the same bits either way.
///
/// # Safety
/// `dst` must be valid for `src.len()` writes.
pub unsafe fn encode_into(src: &[f32], dst: *mut u8) {
    #[cfg(target_arch = "x86_64")]
    if super::attention::simd_available() {
        // SAFETY: AVX2 and F16C were detected; as for this function.
        return unsafe { simd::encode_into(src, dst) };
    }
    for (i, &x) in src.iter().enumerate() {
        // SAFETY: as for this function.
        unsafe { dst.add(i).write(encode(x)) };
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod simd {
    use std::arch::x86_64::*;

    /// [`super::encode_into`] 8 values at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn encode_into(src: &[f32], dst: *mut u8) {
        let n8 = src.len() / 8 * 8;
        let quarter = _mm256_set1_ps(1.0 / super::SCALE);
        for i in (0..n8).step_by(8) {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(
                _mm256_loadu_ps(src.as_ptr().add(i)),
                quarter,
            ));
            let sign = _mm_and_si128(_mm_srli_epi16::<8>(h), _mm_set1_epi16(0x80));
            let mag = _mm_and_si128(h, _mm_set1_epi16(0x7FFF));
            let odd = _mm_and_si128(_mm_srli_epi16::<7>(mag), _mm_set1_epi16(1));
            let rounded =
                _mm_srli_epi16::<7>(_mm_add_epi16(_mm_add_epi16(mag, _mm_set1_epi16(0x3F)), odd));
            let code = _mm_min_epu16(rounded, _mm_set1_epi16(super::MAX_CODE as i16));
            // NaN (magnitude past infinity's bits): 0x7F.
            let nan = _mm_cmpgt_epi16(mag, _mm_set1_epi16(0x7C00));
            let code = _mm_blendv_epi8(code, _mm_set1_epi16(0x7F), nan);
            let bytes = _mm_packus_epi16(_mm_or_si128(code, sign), _mm_setzero_si128());
            _mm_storel_epi64(dst.add(i).cast(), bytes);
        }
        for (i, &x) in src.iter().enumerate().skip(n8) {
            dst.add(i).write(super::encode(x));
        }
    }

    /// 8 codes from `p` as f32 values divided by [`super::SCALE`].
    #[inline(always)]
    pub(in crate::cpu) unsafe fn load8(p: *const u8) -> __m256 {
        let b = _mm_cvtepi8_epi16(_mm_loadl_epi64(p.cast()));
        let h = _mm_and_si128(_mm_slli_epi16::<7>(b), _mm_set1_epi16(0xBF80u16 as i16));
        _mm256_cvtph_ps(h)
    }

    /// 16 codes from `p` as f32 values divided by [`super::SCALE`].
    #[inline(always)]
    pub(in crate::cpu) unsafe fn load16(p: *const u8) -> __m512 {
        let b = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.cast()));
        let h = _mm256_and_si256(
            _mm256_slli_epi16::<7>(b),
            _mm256_set1_epi16(0xBF80u16 as i16),
        );
        _mm512_cvtph_ps(h)
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::*;

    /// Every code decodes to the e4m3fn value its bits say, and encodes back to itself.
    #[test]
    fn every_code_decodes_to_its_value_and_back() {
        for b in 0..=255u8 {
            let (s, e, m) = (b >> 7, (b >> 3) & 0xF, b & 7);
            let mag = if e == 0 {
                m as f64 / 8.0 * 2f64.powi(-6)
            } else {
                (1.0 + m as f64 / 8.0) * 2f64.powi(e as i32 - 7)
            };
            let want = if s == 1 { -mag } else { mag };
            if b & 0x7F == 0x7F {
                assert_eq!(decode(b).abs(), 480.0, "NaN code {b:#x}");
                continue;
            }
            assert_eq!(decode(b) as f64, want, "code {b:#x}");
            assert_eq!(encode(decode(b)), b, "code {b:#x} round trip");
        }
    }

    /// Rounding is to nearest (ties to even), saturating at 448; NaN is 0x7F.
    #[test]
    fn encoding_rounds_to_nearest_even_and_saturates() {
        assert_eq!(decode(encode(1.0 + 1.0 / 16.0)), 1.0); // tie: down to even
        assert_eq!(decode(encode(1.0 + 3.0 / 16.0)), 1.25); // tie: up to even
        assert_eq!(decode(encode(1.07)), 1.125);
        assert_eq!(decode(encode(-3.3)), -3.25);
        assert_eq!(decode(encode(2f32.powi(-10))), 0.0); // half the smallest subnormal: even
        assert_eq!(decode(encode(3.0 * 2f32.powi(-10))), 2f32.powi(-8));
        assert_eq!(decode(encode(15.9 * 2f32.powi(-10))), 2f32.powi(-6)); // into the normals
        assert_eq!(decode(encode(460.0)), 448.0);
        assert_eq!(decode(encode(1e9)), 448.0);
        assert_eq!(decode(encode(f32::NEG_INFINITY)), -448.0);
        assert_eq!(encode(f32::NAN) & 0x7F, 0x7F);
        // The nearest code to x's f16 rounding (the double rounding the module docs describe).
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..10_000 {
            let x = rng.random_range(-500.0f32..500.0) * 2f32.powi(rng.random_range(-12..1));
            let y = decode(encode(x));
            let x = f16::from_f32(x / SCALE).to_f32() * SCALE;
            let step = if x.abs() < 2f32.powi(-6) {
                2f32.powi(-9)
            } else {
                2f32.powi(x.abs().log2().floor() as i32 - 3)
            };
            assert!(
                (y - x).abs() <= step / 2.0 || y.abs() == 448.0,
                "{x} -> {y}"
            );
        }
    }

    /// The vector encoder gives the scalar bits.
    #[test]
    fn vector_encoding_gives_the_scalar_bits() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut xs: Vec<f32> = (0..4093)
            .map(|_| rng.random_range(-600.0f32..600.0) * 2f32.powi(rng.random_range(-14..1)))
            .collect();
        xs.extend([
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            448.0,
            464.0,
            2f32.powi(-10),
        ]);
        let mut got = vec![0u8; xs.len()];
        // SAFETY: `got` holds `xs.len()` bytes.
        unsafe { encode_into(&xs, got.as_mut_ptr()) };
        for (x, g) in xs.iter().zip(&got) {
            assert_eq!(*g, encode(*x), "{x}");
        }
    }
}
