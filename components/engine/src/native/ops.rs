//! The numeric kernels of the native engine, on `f32` activations:
//! - [`Linear`]: `y = x W^T (+ b)` with `W` stored as the checkpoint has it (`[out, in]`), in
//!   f32 or bf16. One row (decode) takes a row-parallel dot-product path that reads each
//!   weight once (memory-bound, both cores streaming); 2-64 rows (decode batches) a
//!   register-tiled AVX2/FMA kernel that also streams the weights once; more rows (prefill) the
//!   `gemm` crate's packed, multi-threaded f32 kernels (bf16 weights widened a slab at a time).
//! - Attention of the query heads sharing a kv head, over a block table's cache rows.
//! - RMSNorm, RoPE, SiLU-gating and the numerically stable softmax the model needs.
//!
//! The hot loops are written once as safe generic Rust and compiled twice: for baseline
//! x86-64, and with AVX2 and FMA enabled (`#[target_feature]`), chosen at run time with
//! `is_x86_feature_detected!`. The only `unsafe` is that dispatch, the AVX2 intrinsics of the
//! tile kernel (bounds asserted before), and the call into `gemm`.
//!
//! Why these and not a tensor library: the forward pass needs six operations, and paged
//! attention reads K/V through block tables no dense tensor type expresses; `candle-core` on
//! the CPU calls the same `gemm` kernels (measured: no speed-up, 3.5 more minutes of cold
//! build). A CUDA backend implements the same [`super::model`] steps with cuBLAS and a paged
//! attention kernel over the same block layout.

use half::bf16;
use rayon::prelude::*;

/// Rows up to which a decode batch uses the register-tiled AVX2 kernel (when the CPU has
/// AVX2 and FMA): it streams the weights once, where `gemm` repacks them on every call.
const TILE_ROWS: usize = 64;

pub enum WeightData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// A linear layer's weight, `[out, in]` row-major, and optional bias.
pub struct Linear {
    pub out_dim: usize,
    pub in_dim: usize,
    pub w: WeightData,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn new(
        out_dim: usize,
        in_dim: usize,
        w: Vec<f32>,
        bias: Option<Vec<f32>>,
        bf: bool,
    ) -> Self {
        debug_assert_eq!(w.len(), out_dim * in_dim);
        let w = if bf {
            WeightData::Bf16(w.into_iter().map(bf16::from_f32).collect())
        } else {
            WeightData::F32(w)
        };
        Self {
            out_dim,
            in_dim,
            w,
            bias,
        }
    }

    /// Bytes of weight data.
    pub fn bytes(&self) -> usize {
        match &self.w {
            WeightData::F32(w) => w.len() * 4,
            WeightData::Bf16(w) => w.len() * 2,
        }
    }

    /// `y[rows, out] = x[rows, in] W^T + b`.
    pub fn forward(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let (n, k) = (self.out_dim, self.in_dim);
        debug_assert_eq!(x.len(), rows * k);
        debug_assert_eq!(y.len(), rows * n);
        if rows == 1 {
            self.gemv(x, y);
        } else if rows <= TILE_ROWS && k % 8 == 0 && has_avx2_fma() {
            self.tiled(x, rows, y);
        } else {
            match &self.w {
                WeightData::F32(w) => gemm_nt(x, rows, k, w, n, y, 0, n),
                WeightData::Bf16(w) => {
                    // Widen a slab of output rows at a time, in parallel over slabs.
                    const SLAB: usize = 256;
                    let mut yt = vec![0f32; rows * n];
                    yt.par_chunks_mut(rows * SLAB)
                        .enumerate()
                        .for_each(|(s, out)| {
                            let lo = s * SLAB;
                            let hi = (lo + SLAB).min(n);
                            let wide: Vec<f32> =
                                w[lo * k..hi * k].iter().map(|v| v.to_f32()).collect();
                            // Slab-major scratch: out[r * (hi - lo) + c].
                            gemm_nt(x, rows, k, &wide, hi - lo, out, 0, hi - lo);
                        });
                    for s in 0..n.div_ceil(SLAB) {
                        let lo = s * SLAB;
                        let width = (lo + SLAB).min(n) - lo;
                        let slab = &yt[rows * lo..rows * lo + rows * width];
                        for r in 0..rows {
                            y[r * n + lo..r * n + lo + width]
                                .copy_from_slice(&slab[r * width..(r + 1) * width]);
                        }
                    }
                }
            }
        }
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(n) {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        }
    }

    /// A decode batch on AVX2: blocks of 3 output features against the inputs 4 rows at a
    /// time, 12 vector accumulators in registers, each weight read once per call.
    fn tiled(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let (n, k) = (self.out_dim, self.in_dim);
        const CHUNK: usize = 48;
        let mut t = vec![0f32; n * rows];
        t.par_chunks_mut(CHUNK * rows)
            .enumerate()
            .for_each(|(c, out)| {
                let lo = c * CHUNK;
                let hi = (lo + CHUNK).min(n);
                let mut wide = Vec::new();
                let w: &[f32] = match &self.w {
                    WeightData::F32(w) => &w[lo * k..hi * k],
                    WeightData::Bf16(w) => {
                        wide.extend(w[lo * k..hi * k].iter().map(|&v| widen(v)));
                        &wide
                    }
                };
                tile_block(x, rows, k, w, hi - lo, out);
            });
        for f in 0..n {
            for r in 0..rows {
                y[r * n + f] = t[f * rows + r];
            }
        }
    }

    /// One row: each output feature's weight row is read once, in parallel over long
    /// contiguous runs of rows (one per thread, and a spare each for balance: fewer, longer
    /// tasks stream better and wake sleeping threads less often).
    fn gemv(&self, x: &[f32], y: &mut [f32]) {
        let (n, k) = (self.out_dim, self.in_dim);
        let chunk = n.div_ceil(2 * rayon::current_num_threads()).max(16);
        y.par_chunks_mut(chunk).enumerate().for_each(|(c, out)| {
            let (lo, hi) = (c * chunk, c * chunk + out.len());
            match &self.w {
                WeightData::F32(w) => dots(x, Rows::F32(&w[lo * k..hi * k]), k, out),
                WeightData::Bf16(w) => dots(x, Rows::Bf16(&w[lo * k..hi * k]), k, out),
            }
        });
    }
}

/// Weight rows of either type.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

/// `out[j] = x . w_j` for each row `w_j` of `w` (rows of `k`): the decode path. Compiled with
/// AVX2 and FMA when the CPU has them (checked at run time), else for baseline x86-64;
/// memory-bound either way once vectorized 8-wide.
fn dots(x: &[f32], w: Rows<'_>, k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time); the function is safe
            // Rust compiled with those features enabled.
            #[allow(unsafe_code)]
            unsafe {
                dots_avx2(x, w, k, out)
            };
            return;
        }
    }
    dots_generic::<false>(x, w, k, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dots_avx2(x: &[f32], w: Rows<'_>, k: usize, out: &mut [f32]) {
    dots_generic::<true>(x, w, k, out)
}

#[inline(always)]
fn dots_generic<const FMA: bool>(x: &[f32], w: Rows<'_>, k: usize, out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = match w {
            Rows::F32(w) => dot_with::<FMA, _>(x, &w[j * k..(j + 1) * k], |v| v),
            Rows::Bf16(w) => dot_with::<FMA, _>(x, &w[j * k..(j + 1) * k], widen),
        };
    }
}

/// A bf16 is the top half of an f32: widening is a shift (vectorizes, unlike a call).
#[inline(always)]
fn widen(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// The one dot-product kernel: sixteen independent accumulators over fixed-size chunks, so
/// the compiler vectorizes it without bounds checks; `b`'s elements go through `wide` (f32 or
/// bf16). With `FMA` (only inside a `#[target_feature(enable = "fma")]` caller) it fuses the
/// multiply-add; without, `mul_add` would be a libm call, so it multiplies and adds.
#[inline(always)]
fn dot_with<const FMA: bool, T: Copy>(a: &[f32], b: &[T], wide: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let mut s = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * wide(*y);
    }
    for (x, y) in ca.zip(cb) {
        let x: &[f32; 16] = x.try_into().expect("chunks of 16");
        let y: &[T; 16] = y.try_into().expect("chunks of 16");
        for l in 0..16 {
            acc[l] = if FMA {
                x[l].mul_add(wide(y[l]), acc[l])
            } else {
                acc[l] + x[l] * wide(y[l])
            };
        }
    }
    s + acc.iter().sum::<f32>()
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[f * rows + r] = x[r] . w[f]` for the `nf` rows of `w` (`[nf, k]`, `k % 8 == 0`).
fn tile_block(x: &[f32], rows: usize, k: usize, w: &[f32], nf: usize, out: &mut [f32]) {
    assert!(k % 8 == 0 && x.len() >= rows * k && w.len() >= nf * k && out.len() >= nf * rows);
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time), and the assert above
            // bounds every pointer `tile_avx2` forms (see its loops).
            #[allow(unsafe_code)]
            unsafe {
                tile_avx2(x, rows, k, w, nf, out)
            };
            return;
        }
    }
    for f in 0..nf {
        for r in 0..rows {
            out[f * rows + r] =
                dot_with::<false, _>(&x[r * k..(r + 1) * k], &w[f * k..(f + 1) * k], |v| v);
        }
    }
}

/// The AVX2 micro-kernel of [`tile_block`]: 3 weight rows x 4 input rows per tile, 8 lanes.
/// Every pointer stays inside `x[..rows * k]` and `w[..nf * k]`: rows and features are walked
/// in whole tiles while they fit, the rest one at a time, and `c` steps by 8 up to `k`.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(x: &[f32], rows: usize, k: usize, w: &[f32], nf: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut f = 0;
    while f < nf {
        let fw = (nf - f).min(3);
        let w0 = wp.add(f * k);
        let w1 = wp.add((f + 1.min(fw - 1)) * k);
        let w2 = wp.add((f + 2.min(fw - 1)) * k);
        let mut r = 0;
        while r < rows {
            if r + 4 <= rows {
                let (x0, x1, x2, x3) = (
                    xp.add(r * k),
                    xp.add((r + 1) * k),
                    xp.add((r + 2) * k),
                    xp.add((r + 3) * k),
                );
                let mut acc = [_mm256_setzero_ps(); 12];
                let mut c = 0;
                while c < k {
                    let a0 = _mm256_loadu_ps(w0.add(c));
                    let a1 = _mm256_loadu_ps(w1.add(c));
                    let a2 = _mm256_loadu_ps(w2.add(c));
                    let b = _mm256_loadu_ps(x0.add(c));
                    acc[0] = _mm256_fmadd_ps(a0, b, acc[0]);
                    acc[1] = _mm256_fmadd_ps(a1, b, acc[1]);
                    acc[2] = _mm256_fmadd_ps(a2, b, acc[2]);
                    let b = _mm256_loadu_ps(x1.add(c));
                    acc[3] = _mm256_fmadd_ps(a0, b, acc[3]);
                    acc[4] = _mm256_fmadd_ps(a1, b, acc[4]);
                    acc[5] = _mm256_fmadd_ps(a2, b, acc[5]);
                    let b = _mm256_loadu_ps(x2.add(c));
                    acc[6] = _mm256_fmadd_ps(a0, b, acc[6]);
                    acc[7] = _mm256_fmadd_ps(a1, b, acc[7]);
                    acc[8] = _mm256_fmadd_ps(a2, b, acc[8]);
                    let b = _mm256_loadu_ps(x3.add(c));
                    acc[9] = _mm256_fmadd_ps(a0, b, acc[9]);
                    acc[10] = _mm256_fmadd_ps(a1, b, acc[10]);
                    acc[11] = _mm256_fmadd_ps(a2, b, acc[11]);
                    c += 8;
                }
                for i in 0..4 {
                    for j in 0..fw {
                        out[(f + j) * rows + r + i] = hsum(acc[i * 3 + j]);
                    }
                }
                r += 4;
            } else {
                let x0 = xp.add(r * k);
                let mut acc = [_mm256_setzero_ps(); 3];
                let mut c = 0;
                while c < k {
                    let b = _mm256_loadu_ps(x0.add(c));
                    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(w0.add(c)), b, acc[0]);
                    acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(w1.add(c)), b, acc[1]);
                    acc[2] = _mm256_fmadd_ps(_mm256_loadu_ps(w2.add(c)), b, acc[2]);
                    c += 8;
                }
                for j in 0..fw {
                    out[(f + j) * rows + r] = hsum(acc[j]);
                }
                r += 1;
            }
        }
        f += fw;
    }
}

/// `y[m, ldy-strided from col0] = x[m, k] w[n, k]^T` with the `gemm` crate, computed as
/// `y^T = w x^T` so that the large operand (the weights) is the left-hand side, which `gemm`
/// streams without repacking, and only the small activations are packed.
#[allow(clippy::too_many_arguments)]
fn gemm_nt(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    y: &mut [f32],
    col0: usize,
    ldy: usize,
) {
    assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= (m - 1) * ldy + col0 + n);
    let threads = if m * n * k >= 1 << 20 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assert above keeps every access in bounds. dst is y^T (n x m): element
    // (j, r) at y[r * ldy + col0 + j]; lhs is w (n x k, row-major); rhs is x^T (k x m):
    // element (i, r) at x[r * k + i]. The slices are not aliased (y is &mut).
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            y.as_mut_ptr().add(col0),
            ldy as isize,
            1,
            false,
            w.as_ptr(),
            1,
            k as isize,
            x.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            threads,
        );
    }
}

/// `out = x / rms(x) * w`, row by row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// `cos` and `sin` of `pos * inv_freq[i]` for one position (computed in f64 once per
/// position and step, shared by every head and layer).
pub fn rope_table(pos: usize, inv_freq: &[f64]) -> Vec<(f32, f32)> {
    inv_freq
        .iter()
        .map(|f| {
            let (sin, cos) = (pos as f64 * f).sin_cos();
            (cos as f32, sin as f32)
        })
        .collect()
}

/// Rotates one head vector in place (the "rotate half" layout of Hugging Face Llama):
/// pairs `(i, i + d/2)` by the angles of [`rope_table`].
pub fn rope(head: &mut [f32], table: &[(f32, f32)]) {
    let half = head.len() / 2;
    for (i, &(cos, sin)) in table.iter().enumerate().take(half) {
        let (a, b) = (head[i], head[i + half]);
        head[i] = a * cos - b * sin;
        head[i + half] = b * cos + a * sin;
    }
}

/// `gate_up` rows hold `[gate (i), up (i)]`; writes `silu(gate) * up` to `out` rows of `i`.
pub fn silu_mul(gate_up: &[f32], i: usize, out: &mut [f32]) {
    for (gu, o) in gate_up.chunks_exact(2 * i).zip(out.chunks_exact_mut(i)) {
        let (g, u) = gu.split_at(i);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// Attention of `rep` query heads (`q`, `rep x hd`) sharing one kv head over the cached
/// positions whose rows start at `offsets` (into `kc`/`vc`; the head at `+ head`), into `out`
/// (`rep x hd`). Compiled twice: with
/// AVX2 and FMA when the CPU has them (checked at run time), and for baseline x86-64.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    rep: usize,
    hd: usize,
    offsets: &[usize],
    head: usize,
    kc: &[f32],
    vc: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time); the function is safe
            // Rust compiled with those features enabled.
            #[allow(unsafe_code)]
            unsafe {
                attend_avx2(q, rep, hd, offsets, head, kc, vc, scale, out)
            };
            return;
        }
    }
    attend_generic::<false>(q, rep, hd, offsets, head, kc, vc, scale, out)
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(
    q: &[f32],
    rep: usize,
    hd: usize,
    offsets: &[usize],
    head: usize,
    kc: &[f32],
    vc: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    attend_generic::<true>(q, rep, hd, offsets, head, kc, vc, scale, out)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_generic<const FMA: bool>(
    q: &[f32],
    rep: usize,
    hd: usize,
    offsets: &[usize],
    head: usize,
    kc: &[f32],
    vc: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let span = offsets.len();
    let mut scores = vec![0f32; rep * span];
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { c + a * b };
    for (t, &row) in offsets.iter().enumerate() {
        let off = row + head;
        let k = &kc[off..off + hd];
        for j in 0..rep {
            let sum = dot_with::<FMA, _>(&q[j * hd..(j + 1) * hd], k, |v| v);
            scores[j * span + t] = sum * scale;
        }
    }
    for j in 0..rep {
        softmax(&mut scores[j * span..(j + 1) * span]);
    }
    out.fill(0.0);
    for (t, &row) in offsets.iter().enumerate() {
        let off = row + head;
        let v = &vc[off..off + hd];
        for j in 0..rep {
            let p = scores[j * span + t];
            for (o, x) in out[j * hd..(j + 1) * hd].iter_mut().zip(v) {
                *o = madd(p, *x, *o);
            }
        }
    }
}

/// `e^x` for `x <= 0` to ~1e-7 relative (Cephes' range reduction and polynomial), in plain
/// arithmetic the compiler vectorizes (`f32::exp` is a libm call per element).
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// In-place, numerically stable softmax with [`exp_neg`] (inlined into the caller's target
/// features).
#[inline(always)]
fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = exp_neg(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * n];
        for r in 0..rows {
            for f in 0..n {
                y[r * n + f] = (0..k).map(|i| x[r * k + i] * w[f * k + i]).sum();
            }
        }
        y
    }

    #[test]
    fn fast_exp_matches_the_library_exp() {
        let mut worst = 0f32;
        for i in 0..20000 {
            let x = -(i as f32) * 0.0043;
            let (a, b) = (exp_neg(x), x.exp());
            worst = worst.max(((a - b) / b.max(f32::MIN_POSITIVE)).abs());
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert!(exp_neg(-200.0) < 1e-37);
    }

    #[test]
    fn linear_paths_agree_with_a_naive_matmul() {
        // k = 72: the AVX2 tile kernel for 2..=64 rows (where the CPU has it); k = 70: gemm.
        for k in [72, 70] {
            check_linear(300, k);
        }
    }

    fn check_linear(n: usize, k: usize) {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        for rows in [1, 3, 8, 9, 40] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 16.0)
                .collect();
            let want = naive(&x, rows, &w, n, k);
            for bf in [false, true] {
                let lin = Linear::new(n, k, w.clone(), None, bf);
                let mut y = vec![0f32; rows * n];
                lin.forward(&x, rows, &mut y);
                let tol = if bf { 0.05 } else { 1e-4 };
                for (a, b) in y.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= tol * (1.0 + b.abs()),
                        "rows {rows} bf16 {bf}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
