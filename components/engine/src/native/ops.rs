//! The numeric kernels of the native engine, on `f32` activations:
//! - [`Linear`]: `y = x W^T (+ b)` with `W` stored as the checkpoint has it (`[out, in]`), in
//!   f32 or bf16. Few rows (decode) take a row-parallel dot-product path that reads each weight
//!   once (memory-bound, both cores streaming); more rows (prefill) go to the `gemm` crate's
//!   packed, multi-threaded f32 kernels (bf16 weights are widened one slab at a time).
//! - RMSNorm, RoPE, SiLU-gating and the numerically stable softmax the model needs.
//!
//! Why these and not a tensor library: the forward pass needs six operations, and paged
//! attention reads K/V through block tables no dense tensor type expresses; `candle-core` on
//! the CPU calls the same `gemm` kernels (measured: no speed-up, 3.5 more minutes of cold
//! build). A CUDA backend implements the same [`super::model`] steps with cuBLAS and a paged
//! attention kernel over the same block layout.

use half::bf16;
use rayon::prelude::*;

/// Rows at or below which a matmul is a batch of dot products (each weight read once).
const GEMV_ROWS: usize = 1;

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
        if rows <= GEMV_ROWS {
            self.gemv(x, rows, y);
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

    /// Few rows: each output feature's weight row is read once and dotted with every input.
    fn gemv(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let (n, k) = (self.out_dim, self.in_dim);
        // Outputs are computed feature-major into `t` ([n, rows]) in parallel chunks, then
        // transposed into `y`.
        const CHUNK: usize = 64;
        let mut t = vec![0f32; n * rows];
        t.par_chunks_mut(CHUNK * rows)
            .enumerate()
            .for_each(|(c, out)| {
                for (j, o) in out.chunks_exact_mut(rows).enumerate() {
                    let f = c * CHUNK + j;
                    for (r, v) in o.iter_mut().enumerate() {
                        let xr = &x[r * k..(r + 1) * k];
                        *v = match &self.w {
                            WeightData::F32(w) => dot(xr, &w[f * k..(f + 1) * k]),
                            WeightData::Bf16(w) => dot_bf16(xr, &w[f * k..(f + 1) * k]),
                        };
                    }
                }
            });
        for f in 0..n {
            for r in 0..rows {
                y[r * n + f] = t[f * rows + r];
            }
        }
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

/// A dot product with sixteen independent accumulators over fixed-size chunks, so the
/// compiler vectorizes it without bounds checks (`mul_add` would be a libm call on a build
/// without FMA enabled).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        let x: &[f32; 16] = x.try_into().expect("chunks of 16");
        let y: &[f32; 16] = y.try_into().expect("chunks of 16");
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// [`dot`] against bf16 weights, widened in registers (a bf16 is the top half of an f32).
#[inline]
pub fn dot_bf16(a: &[f32], b: &[bf16]) -> f32 {
    let wide = |v: bf16| f32::from_bits((v.to_bits() as u32) << 16);
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        let x: &[f32; 16] = x.try_into().expect("chunks of 16");
        let y: &[bf16; 16] = y.try_into().expect("chunks of 16");
        for i in 0..16 {
            acc[i] += x[i] * wide(y[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * wide(*y);
    }
    s
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

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
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
    fn linear_paths_agree_with_a_naive_matmul() {
        let (n, k) = (300, 70);
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
