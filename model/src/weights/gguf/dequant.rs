//! Block decoders: ggml tensor bytes to `f32`, following ggml's reference `dequantize_row_*` in
//! `ggml-quants.c` for F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K and Q6_K. Other types are an
//! [`GgufError::UnsupportedDequant`] naming the type. Callers guarantee the byte and output lengths
//! (see [`dequantize`]); [`super::GgufFile::tensor_f32`] checks them against the tensor directory.

use half::{bf16, f16};

use super::{GgmlType, GgufError};

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) of a Q4_K super-block.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Decodes `n_elements` values of type `dtype` from `bytes` into `out[..n_elements]`, following
/// ggml's `dequantize_row_*`. `n_elements` must be a multiple of the block size; `bytes` must hold
/// at least the `n_elements / block_size * type_size` bytes that are read, and `out` at least
/// `n_elements` values.
pub fn dequantize(
    dtype: GgmlType,
    bytes: &[u8],
    n_elements: usize,
    out: &mut [f32],
) -> Result<(), GgufError> {
    let unsupported = || GgufError::UnsupportedDequant {
        id: dtype.id(),
        name: dtype.name(),
    };
    if !dtype.can_dequantize() {
        return Err(unsupported());
    }
    let (Some(block), Some(type_size)) = (dtype.block_size(), dtype.type_size()) else {
        return Err(unsupported());
    };
    let n = n_elements as u64;
    if !n.is_multiple_of(block) {
        return Err(GgufError::NotBlockMultiple {
            dtype: dtype.name(),
            n_elements: n,
            block_size: block,
        });
    }
    let needed = (n / block).checked_mul(type_size);
    let src = needed
        .and_then(|needed| bytes.get(..usize::try_from(needed).ok()?))
        .ok_or_else(|| GgufError::ShortInput {
            dtype: dtype.name(),
            n_elements: n,
            needed: needed.unwrap_or(u64::MAX),
            found: bytes.len() as u64,
        })?;
    let found = out.len() as u64;
    let dst = out
        .get_mut(..n_elements)
        .ok_or(GgufError::ShortOutput { needed: n, found })?;
    let bs = block as usize;
    let ts = type_size as usize;
    let blocks = dst.chunks_exact_mut(bs).zip(src.chunks_exact(ts));
    match dtype {
        GgmlType::F32 => {
            for (o, b) in blocks {
                o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, b) in blocks {
                o[0] = f16_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (o, b) in blocks {
                o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in blocks {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                for (j, &q) in qs.iter().enumerate() {
                    o[j] = d * ((q & 0xF) as i32 - 8) as f32;
                    o[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in blocks {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..20];
                for (j, &q) in qs.iter().enumerate() {
                    o[j] = d * (q & 0xF) as f32 + m;
                    o[j + 16] = d * (q >> 4) as f32 + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in blocks {
                let d = f16_at(b, 0);
                for (x, &q) in o.iter_mut().zip(&b[2..34]) {
                    *x = d * (q as i8) as f32;
                }
            }
        }
        GgmlType::Q4_K => {
            // d, dmin (f16), 12 bytes of packed 6-bit scales and mins, 128 bytes of nibbles: four
            // groups of 64 values, each 32 low nibbles (scale 2g) then 32 high nibbles (scale 2g+1).
            for (o, b) in blocks {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (g, (y, q)) in o.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * g, scales);
                    let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                    let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
                    for l in 0..32 {
                        y[l] = d1 * (q[l] & 0xF) as f32 - min1;
                        y[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            // 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 i8 scales, d (f16); two
            // halves of 128 values.
            for (o, b) in blocks {
                let d = f16_at(b, 208);
                for (h, y) in o.chunks_exact_mut(128).enumerate() {
                    let ql = &b[64 * h..64 * h + 64];
                    let qh = &b[128 + 32 * h..128 + 32 * h + 32];
                    let sc = &b[192 + 8 * h..192 + 8 * h + 8];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
        GgmlType::Other(_) => return Err(unsupported()),
    }
    Ok(())
}
