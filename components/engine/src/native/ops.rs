//! The numeric kernels of the native engine, on `f32` activations:
//! - [`Linear`]: `y = x W^T (+ b)`, every row count (a decode token, a decode batch, a prefill
//!   chunk) through one kernel over weights repacked at load time into panels of 16 output
//!   features (`[panel][in][16]` in f32 or f16, `[panel][in / 2][16][2]` in bf16). Half-type
//!   weights stay half in memory (half the bytes a decode step streams) and are widened in
//!   registers. A panel is one contiguous stream, so the hardware prefetcher (helped by a
//!   software prefetch) keeps up at any batch size. The micro-kernel keeps a block of outputs
//!   in registers so that each weight vector loaded serves several rows: 16 features x 6 rows
//!   with AVX2/FMA, 16 features x up to 16 rows with AVX-512. Panels are split across the
//!   cores; the input dimension is walked in blocks whose panel slice stays in L1 while every
//!   row uses it. bf16 matmuls run on AMX tiles where the CPU has them (module `amx`): the
//!   bf16 panel is already a tile operand.
//! - Attention of the query heads sharing a kv head, over a block table's cache rows, in f32,
//!   f16 or bf16 ([`KvElem`]).
//! - RMSNorm, RoPE, SiLU-gating and the numerically stable softmax the model needs.
//!
//! The hot loops are compiled for baseline x86-64 and again with AVX2/FMA/F16C and AVX-512
//! enabled (`#[target_feature]`), and [`Simd`] picks the best level the CPU has at run time
//! (`is_x86_feature_detected!`, CPUID and the OS's permission for AMX). The only `unsafe` is
//! that dispatch and the SIMD kernels: intrinsics (and AMX's inline assembly) over raw
//! pointers whose bounds are checked before, and the matmul's writes into disjoint column
//! strips of one output.
//!
//! Why these and not a tensor library: the forward pass needs six operations, and paged
//! attention reads K/V through block tables no dense tensor type expresses; a decode step is
//! a skinny matmul whose speed is the weight stream, which general GEMMs (`gemm`, and
//! `candle-core` on top of it) repack on every call. A CUDA backend implements the same
//! [`super::model`] steps with cuBLAS and a paged attention kernel over the same block layout.

use half::{bf16, f16};
use rayon::prelude::*;

/// Output features per weight panel (two AVX2 vectors, one AVX-512 vector).
const PANEL: usize = 16;
/// Input positions per block of the walk: a panel's slice (16 KiB in f32) stays in L1 while
/// every row group uses it.
const K_BLOCK: usize = 256;
/// Rows per micro-kernel call (12 accumulators + 2 weight vectors + 1 broadcast fit AVX2's 16
/// registers).
const ROW_GROUP: usize = 6;
/// Rows per AVX-512 micro-kernel call (16 accumulators of its 32 registers).
const ROW_GROUP_512: usize = 16;
/// How far ahead of the multi-row kernel the weight stream is prefetched, in bytes: without
/// it the hardware prefetcher falls behind once each weight feeds several rows (measured on
/// 8 rows: ~19 GB/s of weights without, ~24 GB/s with). The one-row kernel streams fast
/// enough without (and slower with).
const PREFETCH_AHEAD: usize = 2048;
/// Below this many multiply-adds a matmul runs on the calling thread: waking the pool costs
/// more.
const PARALLEL_MIN: usize = 1 << 16;

/// The type a model's weights are held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compute {
    #[default]
    F32,
    /// bf16 weights. Where the CPU has AMX (Sapphire Rapids and later), matmuls run on its
    /// tiles: the activations are rounded to bf16 and `tdpbf16ps` sums bf16 products into
    /// f32. Without AMX the weights are widened to f32 in registers. (AVX512_BF16's `vdpbf16ps` was measured slower than
    /// widening and f32 multiply-adds on Sapphire Rapids: 23 against 30 GMAC/s per core.)
    Bf16,
    /// f16 weights, widened to f32 in registers by the CPU's half-precision conversion
    /// (`vcvtph2ps`); the arithmetic is f32. (AVX512-FP16 multiplies in f16 only, with f16
    /// sums: too coarse for a 576-long dot product.)
    F16,
}

impl Compute {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

/// Weights repacked as panels of 16 output features, the last panel zero-padded.
/// - f32 and f16: element `(f, c)` at `((f / 16) * in + c) * 16 + f % 16`.
/// - bf16: inputs in pairs, the operand layout of the bf16 dot product: `(f, c)` at
///   `((f / 16) * in2 + c - c % 2) * 16 + 2 * (f % 16) + c % 2`, `in2` being the input count
///   rounded up to even (the pad is zero). A pair takes the bytes two f16 inputs would, so the
///   walk over a panel is the same for both.
pub enum WeightData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

/// The weight kinds, as the SIMD kernels' const parameter.
const WF32: u8 = 0;
const WBF16: u8 = 1;
const WF16: u8 = 2;

impl WeightData {
    fn len(&self) -> usize {
        match self {
            Self::F32(w) => w.len(),
            Self::Bf16(w) => w.len(),
            Self::F16(w) => w.len(),
        }
    }

    /// The kernels' name for the type ([`WF32`], [`WBF16`], [`WF16`]).
    fn kind(&self) -> u8 {
        match self {
            Self::F32(_) => WF32,
            Self::Bf16(_) => WBF16,
            Self::F16(_) => WF16,
        }
    }

    /// Weight `(f, c)` of a matrix with `k` inputs, widened (the portable kernel).
    fn at(&self, f: usize, c: usize, k: usize) -> f32 {
        let (p, lane) = (f / PANEL, f % PANEL);
        match self {
            Self::F32(w) => w[(p * k + c) * PANEL + lane],
            Self::F16(w) => w[(p * k + c) * PANEL + lane].to_f32(),
            Self::Bf16(w) => {
                let k2 = k.next_multiple_of(2);
                widen(w[(p * k2 + c - c % 2) * PANEL + 2 * lane + c % 2])
            }
        }
    }
}

/// `w` (`[n, k]` row-major) as panels of `T` (see [`WeightData`]), `pairs` for the bf16
/// layout.
fn pack<T: Copy>(
    w: &[f32],
    n: usize,
    k: usize,
    pairs: bool,
    zero: T,
    to: impl Fn(f32) -> T,
) -> Vec<T> {
    let kw = if pairs { k.next_multiple_of(2) } else { k };
    let mut out = vec![zero; n.div_ceil(PANEL) * kw * PANEL];
    for (f, row) in w.chunks_exact(k.max(1)).enumerate() {
        let (p, lane) = (f / PANEL, f % PANEL);
        let panel = &mut out[p * kw * PANEL..(p + 1) * kw * PANEL];
        for (c, &v) in row.iter().enumerate() {
            let at = if pairs {
                (c - c % 2) * PANEL + 2 * lane + c % 2
            } else {
                c * PANEL + lane
            };
            panel[at] = to(v);
        }
    }
    out
}

/// A linear layer's weight and optional bias.
pub struct Linear {
    pub out_dim: usize,
    pub in_dim: usize,
    pub w: WeightData,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// `w` is `[out, in]` row-major, as checkpoints store it; it is held as `compute` says.
    pub fn new(
        out_dim: usize,
        in_dim: usize,
        w: Vec<f32>,
        bias: Option<Vec<f32>>,
        compute: Compute,
    ) -> Self {
        assert_eq!(w.len(), out_dim * in_dim, "weight shape");
        let (n, k) = (out_dim, in_dim);
        let w = match compute {
            Compute::F32 => WeightData::F32(pack(&w, n, k, false, 0.0, |v| v)),
            Compute::F16 => WeightData::F16(pack(&w, n, k, false, f16::ZERO, f16::from_f32)),
            Compute::Bf16 => WeightData::Bf16(pack(&w, n, k, true, bf16::ZERO, bf16::from_f32)),
        };
        Self {
            out_dim,
            in_dim,
            w,
            bias,
        }
    }

    /// Bytes of weight data (including the last panel's padding).
    pub fn bytes(&self) -> usize {
        self.w.len() * weight_shape(self.w.kind(), 0).0
    }

    /// `y[rows, out] = x[rows, in] W^T + b`.
    pub fn forward(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        self.forward_with(x, rows, y, Simd::best())
    }

    /// [`Self::forward`] with the kernels of one instruction set (one the CPU has).
    fn forward_with(&self, x: &[f32], rows: usize, y: &mut [f32], simd: Simd) {
        let (n, k) = (self.out_dim, self.in_dim);
        assert!(
            x.len() >= rows * k && y.len() >= rows * n,
            "matmul operand sizes"
        );
        // AMX takes its activations as bf16 pairs too, in blocks of 32 rows.
        let amx = simd == Simd::Amx && amx_fits(&self.w, rows, k);
        let (simd, xb) = match (simd, amx) {
            (Simd::Amx, true) => (
                simd,
                bf16_pairs(&x[..rows * k], k, rows.next_multiple_of(32)),
            ),
            (Simd::Amx, false) => (Simd::Avx512, Vec::new()),
            _ => (simd, Vec::new()),
        };
        let panels = n.div_ceil(PANEL);
        let out = OutPtr(y.as_mut_ptr());
        let run = |lo: usize, hi: usize| {
            let strip = Strip {
                x,
                xb: &xb,
                rows,
                k,
                n,
                lo,
                hi,
                y: out,
            };
            panels_dispatch(strip, &self.w, simd)
        };
        if rows * n * k < PARALLEL_MIN || rayon::current_num_threads() == 1 {
            run(0, panels);
        } else {
            // Contiguous runs of panels (long streams), a few per thread for balance.
            let per_thread = if rows <= 64 { 2 } else { 8 };
            let tasks = (per_thread * rayon::current_num_threads()).min(panels);
            (0..tasks)
                .into_par_iter()
                .for_each(|t| run(t * panels / tasks, (t + 1) * panels / tasks));
        }
        if let Some(b) = &self.bias {
            for row in y[..rows * n].chunks_exact_mut(n) {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        }
    }
}

/// Whether a matmul of `rows` goes through AMX tiles: bf16 weights and inputs in whole tiles
/// (32). Every row count does, one decode token too (the tile streams the weights at the
/// memory's speed), so a token's arithmetic is the same alone or in a batch.
fn amx_fits(w: &WeightData, rows: usize, k: usize) -> bool {
    matches!(w, WeightData::Bf16(_)) && rows > 0 && k.is_multiple_of(32)
}

/// Rows of `k` activations rounded to bf16 (to nearest, ties to even), as pairs in `u32`s
/// (the first of a pair in the low half), each row padded with a zero to whole pairs, and
/// zero rows up to `padded_rows`.
fn bf16_pairs(x: &[f32], k: usize, padded_rows: usize) -> Vec<u32> {
    let k2 = k.div_ceil(2);
    let rows = x.len() / k.max(1);
    let mut out = vec![0u32; padded_rows.max(rows) * k2];
    let convert = |(xr, or): (&[f32], &mut [u32])| {
        #[cfg(target_arch = "x86_64")]
        if has_avx512_bf16() {
            // SAFETY: the CPU has AVX512_BF16 (checked at run time); `or` holds half of `xr`.
            #[allow(unsafe_code)]
            unsafe {
                return bf16_row_avx512(xr, or);
            }
        }
        bf16_row(xr, or)
    };
    if rows >= 64 {
        x.par_chunks(k)
            .zip(out.par_chunks_mut(k2))
            .for_each(convert);
    } else {
        x.chunks(k).zip(out.chunks_mut(k2)).for_each(convert);
    }
    out
}

/// One row of [`bf16_pairs`] (half's rounding: to nearest, ties to even).
fn bf16_row(xr: &[f32], or: &mut [u32]) {
    let bits = |v: f32| bf16::from_f32(v).to_bits() as u32;
    for (pair, o) in xr.chunks(2).zip(or.iter_mut()) {
        *o = bits(pair[0]) | pair.get(1).map_or(0, |&v| bits(v) << 16);
    }
}

/// [`bf16_row`] 32 values at a time with `vcvtne2ps2bf16` (the same rounding; the instruction
/// takes denormal inputs as zero, which no activation is).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn bf16_row_avx512(xr: &[f32], or: &mut [u32]) {
    use std::arch::x86_64::*;
    assert!(or.len() * 2 >= xr.len());
    let whole = xr.len() / 32 * 32;
    for c in (0..whole).step_by(32) {
        let lo = _mm512_loadu_ps(xr.as_ptr().add(c));
        let hi = _mm512_loadu_ps(xr.as_ptr().add(c + 16));
        // The low 16 words come from the second operand.
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(or.as_mut_ptr().add(c / 2).cast(), v);
    }
    bf16_row(&xr[whole..], &mut or[whole / 2..]);
}

#[cfg(target_arch = "x86_64")]
fn has_avx512_bf16() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::is_x86_feature_detected!("avx512bf16")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
    })
}

/// The output matrix, shared by the tasks of one matmul: each writes only the columns of its
/// own panels.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint column ranges (their panels') of one `&mut [f32]` that
// outlives them (`forward` holds it across the parallel loop).
#[allow(unsafe_code)]
unsafe impl Send for OutPtr {}
#[allow(unsafe_code)]
unsafe impl Sync for OutPtr {}

/// One task's share of a matmul: output panels `lo..hi` of `y[rows, n] = x[rows, k] W^T`.
#[derive(Clone, Copy)]
struct Strip<'a> {
    x: &'a [f32],
    /// `x` as bf16 pairs (`ceil(rows / 32) * 32 x k / 2`), for the AMX kernel; else empty.
    xb: &'a [u32],
    rows: usize,
    k: usize,
    n: usize,
    lo: usize,
    hi: usize,
    y: OutPtr,
}

/// A strip with the kernels of `simd`, else portable Rust.
fn panels_dispatch(s: Strip<'_>, w: &WeightData, simd: Simd) {
    let Strip {
        x,
        rows,
        k,
        n,
        lo,
        hi,
        y,
        ..
    } = s;
    let kw = weight_shape(w.kind(), k).1;
    assert!(
        hi * PANEL <= n.div_ceil(PANEL) * PANEL
            && w.len() >= hi * kw * PANEL
            && x.len() >= rows * k
    );
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `simd` names an instruction set the CPU has (`Simd::best`, or a test's
        // `Simd::available`); the assert above and `forward`'s bound every read (panels below
        // `hi`, rows below `rows`, inputs below `k`, pairs of `xb` below `rows x ceil(k / 2)`,
        // which `bf16_pairs` sizes) and write (rows below `rows`, columns of panels `lo..hi`
        // below `n`).
        #[allow(unsafe_code)]
        unsafe {
            let wp = match w {
                WeightData::F32(w) => w.as_ptr().cast::<u8>(),
                WeightData::Bf16(w) => w.as_ptr().cast::<u8>(),
                WeightData::F16(w) => w.as_ptr().cast::<u8>(),
            };
            match (simd, w) {
                (Simd::Amx, WeightData::Bf16(_)) => {
                    assert!(
                        amx_fits(w, rows, k) && s.xb.len() >= rows.next_multiple_of(32) * k / 2
                    );
                    return amx::strip(s, wp);
                }
                (Simd::Avx512 | Simd::Amx, WeightData::F32(_)) => {
                    return panels_avx512::<WF32>(s, wp)
                }
                (Simd::Avx512, WeightData::Bf16(_)) => return panels_avx512::<WBF16>(s, wp),
                (Simd::Avx512 | Simd::Amx, WeightData::F16(_)) => {
                    return panels_avx512::<WF16>(s, wp)
                }
                (Simd::Avx2, WeightData::F32(_)) => return panels_avx2::<WF32>(s, wp),
                (Simd::Avx2, WeightData::Bf16(_)) => return panels_avx2::<WBF16>(s, wp),
                (Simd::Avx2, WeightData::F16(_)) => return panels_avx2::<WF16>(s, wp),
                (Simd::Portable, _) => {}
            }
        }
    }
    for p in lo..hi {
        let cols = (n - p * PANEL).min(PANEL);
        for r in 0..rows {
            let mut acc = [0f32; PANEL];
            let xr = &x[r * k..(r + 1) * k];
            for (c, &xv) in xr.iter().enumerate() {
                for (l, a) in acc.iter_mut().enumerate() {
                    *a += xv * w.at(p * PANEL + l, c, k);
                }
            }
            // SAFETY: row r < rows and columns p*16..p*16+cols < n of the caller's `y`, a
            // range no other task writes (see `OutPtr`).
            #[allow(unsafe_code)]
            unsafe {
                std::ptr::copy_nonoverlapping(acc.as_ptr(), y.0.add(r * n + p * PANEL), cols);
            }
        }
    }
}

/// One micro-kernel call: rows of `x` (`k` apart) times a panel's inputs `c0..c1` (`w` at the
/// panel's start; `c0` even), stored into (`first`) or added to rows of `y` (`ldy` apart).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Tile {
    x: *const f32,
    k: usize,
    w: *const u8,
    c0: usize,
    c1: usize,
    first: bool,
    y: *mut f32,
    ldy: usize,
}

/// The walk over a strip's panels shared by the SIMD bodies: per panel, input blocks of
/// [`K_BLOCK`] (the first block stores, later ones add) and, inside each, row groups of at most
/// `G` rows through `micro(rows in the group, tile)`. The zero-padded last panel goes through
/// a scratch tile in one block so that only its valid columns are written. `elem` is the
/// weight's size, `kw` the inputs a panel stores.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn panel_walk<const G: usize>(
    s: Strip<'_>,
    w: *const u8,
    elem: usize,
    kw: usize,
    micro: impl Fn(usize, Tile),
) {
    let Strip {
        x,
        rows,
        k,
        n,
        lo,
        hi,
        y,
        ..
    } = s;
    let mut tmp = [[0f32; PANEL]; 16];
    assert!(G <= tmp.len());
    for p in lo..hi {
        let tile = |r: usize, c0: usize, c1: usize, y: *mut f32, ldy: usize| Tile {
            x: x.as_ptr().add(r * k),
            k,
            w: w.add(p * kw * PANEL * elem),
            c0,
            c1,
            first: c0 == 0,
            y,
            ldy,
        };
        let cols = (n - p * PANEL).min(PANEL);
        if cols < PANEL {
            for (r, g) in row_groups(rows, G) {
                micro(g, tile(r, 0, k, tmp.as_mut_ptr().cast(), PANEL));
                for (i, t) in tmp.iter().enumerate().take(g) {
                    std::ptr::copy_nonoverlapping(
                        t.as_ptr(),
                        y.0.add((r + i) * n + p * PANEL),
                        cols,
                    );
                }
            }
            continue;
        }
        let mut c0 = 0;
        while c0 < k {
            let c1 = (c0 + K_BLOCK).min(k);
            for (r, g) in row_groups(rows, G) {
                micro(g, tile(r, c0, c1, y.0.add(r * n + p * PANEL), n));
            }
            c0 = c1;
        }
    }
}

/// AVX2/FMA body of [`panels_dispatch`] (`w` points at panels of kind `W`).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panels_avx2<const W: u8>(s: Strip<'_>, w: *const u8) {
    let (elem, kw) = weight_shape(W, s.k);
    panel_walk::<ROW_GROUP>(s, w, elem, kw, |g, t| micro_any::<W>(g, t));
}

/// Bytes per weight and inputs a panel stores, for weights of kind `w` and `k` inputs (bf16
/// pairs round `k` up to even).
fn weight_shape(w: u8, k: usize) -> (usize, usize) {
    match w {
        WF32 => (4, k),
        WBF16 => (2, k.next_multiple_of(2)),
        _ => (2, k),
    }
}

/// AVX-512 body of [`panels_dispatch`]: a panel is one 16-lane register, and up to 16 rows
/// share each weight vector (16 accumulators of the 32 registers; the input is broadcast
/// straight from memory into each multiply-add), so a row group loads about one operand per
/// multiply-add instead of two-thirds of one per 8-lane AVX2 multiply-add.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn panels_avx512<const W: u8>(s: Strip<'_>, w: *const u8) {
    if W == WF16 && s.rows > ROW_GROUP_512 {
        return f16_widened(s, w);
    }
    let (elem, kw) = weight_shape(W, s.k);
    panel_walk::<ROW_GROUP_512>(s, w, elem, kw, |g, t| micro512_any::<W>(g, t));
}

/// [`panels_avx512`] for f16 panels and several row groups: each block of a panel's inputs is
/// widened once into an f32 scratch (16 KiB, in L1) that every row group then reads with the
/// f32 kernel, instead of each row group converting it again (a conversion takes a slot of
/// the port the multiply-adds use). Measured on a 512x576x1536 f16 matmul, 15 paired
/// alternations in one process, twice: converting per row group takes 1.04-1.06x the time.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn f16_widened(s: Strip<'_>, w: *const u8) {
    use std::arch::x86_64::*;
    let Strip {
        x,
        rows,
        k,
        n,
        lo,
        hi,
        y,
        ..
    } = s;
    let mut scratch = vec![0f32; K_BLOCK * PANEL];
    for p in lo..hi {
        let pw = w.add(p * k * PANEL * 2);
        let cols = (n - p * PANEL).min(PANEL);
        // The zero-padded last panel accumulates into its own rows, copied out at the end.
        let mut part = if cols < PANEL {
            vec![0f32; rows * PANEL]
        } else {
            Vec::new()
        };
        let mut c0 = 0;
        while c0 < k {
            let c1 = (c0 + K_BLOCK).min(k);
            for c in c0..c1 {
                let v = _mm512_cvtph_ps(_mm256_loadu_si256(pw.add(c * PANEL * 2).cast()));
                _mm512_storeu_ps(scratch.as_mut_ptr().add((c - c0) * PANEL), v);
            }
            for (r, g) in row_groups(rows, ROW_GROUP_512) {
                let (out, ldy) = if cols < PANEL {
                    (part.as_mut_ptr().add(r * PANEL), PANEL)
                } else {
                    (y.0.add(r * n + p * PANEL), n)
                };
                let t = Tile {
                    x: x.as_ptr().add(r * k + c0),
                    k,
                    w: scratch.as_ptr().cast(),
                    c0: 0,
                    c1: c1 - c0,
                    first: c0 == 0,
                    y: out,
                    ldy,
                };
                micro512_any::<WF32>(g, t);
            }
            c0 = c1;
        }
        for (r, row) in part.chunks_exact(PANEL).enumerate() {
            std::ptr::copy_nonoverlapping(row.as_ptr(), y.0.add(r * n + p * PANEL), cols);
        }
    }
}

/// The AVX-512 kernel for a group of `g` rows.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn micro512_any<const W: u8>(g: usize, t: Tile) {
    match g {
        16 => micro512::<16, W>(t),
        15 => micro512::<15, W>(t),
        14 => micro512::<14, W>(t),
        13 => micro512::<13, W>(t),
        12 => micro512::<12, W>(t),
        11 => micro512::<11, W>(t),
        10 => micro512::<10, W>(t),
        9 => micro512::<9, W>(t),
        8 => micro512::<8, W>(t),
        7 => micro512::<7, W>(t),
        1 => micro512_1::<W>(t),
        // 2-6 rows: the AVX2 kernels.
        _ => micro_any::<W>(g, t),
    }
}

/// 16 f32 or f16 weights at byte `at`, widened to f32.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn load16<const W: u8>(w: *const u8, at: usize) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    if W == WF16 {
        _mm512_cvtph_ps(_mm256_loadu_si256(w.add(at).cast()))
    } else {
        _mm512_loadu_ps(w.add(at).cast())
    }
}

/// [`micro512`] for one row (a decode token): four accumulators over consecutive input
/// positions (pairs for bf16), so the weight stream is not held up by FMA latency.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn micro512_1<const W: u8>(t: Tile) {
    use std::arch::x86_64::*;
    let Tile { x, w, y, .. } = t;
    let (c0, c1) = (t.c0, t.c1);
    let mut acc = [_mm512_setzero_ps(); 4];
    let line = if W == WF32 { PANEL * 4 } else { PANEL * 2 };
    let mut c = c0;
    if W == WBF16 {
        let mask = _mm512_set1_epi32(-65536);
        while c + 4 <= c1 {
            for u in 0..2 {
                let v = _mm512_loadu_si512(w.add((c + 2 * u) * PANEL * 2).cast());
                let lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
                let hi = _mm512_castsi512_ps(_mm512_and_si512(v, mask));
                acc[2 * u] = _mm512_fmadd_ps(lo, _mm512_set1_ps(*x.add(c + 2 * u)), acc[2 * u]);
                acc[2 * u + 1] =
                    _mm512_fmadd_ps(hi, _mm512_set1_ps(*x.add(c + 2 * u + 1)), acc[2 * u + 1]);
            }
            c += 4;
        }
        while c < c1 {
            let v = _mm512_loadu_si512(w.add(c * PANEL * 2).cast());
            let lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            acc[0] = _mm512_fmadd_ps(lo, _mm512_set1_ps(*x.add(c)), acc[0]);
            if c + 1 < c1 {
                let hi = _mm512_castsi512_ps(_mm512_and_si512(v, mask));
                acc[1] = _mm512_fmadd_ps(hi, _mm512_set1_ps(*x.add(c + 1)), acc[1]);
            }
            c += 2;
        }
    } else {
        while c + 4 <= c1 {
            for (u, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(
                    load16::<W>(w, (c + u) * line),
                    _mm512_set1_ps(*x.add(c + u)),
                    *a,
                );
            }
            c += 4;
        }
        while c < c1 {
            acc[0] = _mm512_fmadd_ps(load16::<W>(w, c * line), _mm512_set1_ps(*x.add(c)), acc[0]);
            c += 1;
        }
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    store512(y, sum, t.first);
}

/// Stores 16 outputs (`first`) or adds them to what is there.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn store512(o: *mut f32, v: std::arch::x86_64::__m512, first: bool) {
    use std::arch::x86_64::*;
    let v = if first {
        v
    } else {
        _mm512_add_ps(v, _mm512_loadu_ps(o))
    };
    _mm512_storeu_ps(o, v);
}

/// [`micro`] in 16-lane registers: `R` accumulators, one weight load per input position (per
/// pair of them for bf16).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn micro512<const R: usize, const W: u8>(t: Tile) {
    use std::arch::x86_64::*;
    let Tile {
        x, k, w, y, ldy, ..
    } = t;
    let mut acc = [_mm512_setzero_ps(); R];
    if W == WBF16 {
        // A pair's 16 lanes hold (input c, input c + 1) per feature: the low halves shifted up
        // and the high halves masked are the two inputs' weights.
        let mask = _mm512_set1_epi32(-65536);
        let mut c = t.c0;
        while c < t.c1 {
            _mm_prefetch::<_MM_HINT_T0>(w.add(c * PANEL * 2 + PREFETCH_AHEAD).cast());
            let v = _mm512_loadu_si512(w.add(c * PANEL * 2).cast());
            let lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            let hi = _mm512_castsi512_ps(_mm512_and_si512(v, mask));
            let two = c + 1 < t.c1;
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(lo, _mm512_set1_ps(*x.add(i * k + c)), *a);
                if two {
                    *a = _mm512_fmadd_ps(hi, _mm512_set1_ps(*x.add(i * k + c + 1)), *a);
                }
            }
            c += 2;
        }
    } else {
        let line = if W == WF32 { PANEL * 4 } else { PANEL * 2 };
        for c in t.c0..t.c1 {
            _mm_prefetch::<_MM_HINT_T0>(w.add(c * line + PREFETCH_AHEAD).cast());
            let wv = if W == WF16 {
                _mm512_cvtph_ps(_mm256_loadu_si256(w.add(c * line).cast()))
            } else {
                _mm512_loadu_ps(w.add(c * line).cast())
            };
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(wv, _mm512_set1_ps(*x.add(i * k + c)), *a);
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        store512(y.add(i * ldy), *a, t.first);
    }
}

/// `rows` split into as few groups of at most `max` as possible, of near-equal size (8 rows
/// as 4 + 4, not 6 + 2: a small group has too few accumulators to hide FMA latency).
/// Yields `(first row, group size)`.
fn row_groups(rows: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let groups = rows.div_ceil(max).max(1);
    (0..groups).map(move |i| {
        let (lo, hi) = (i * rows / groups, (i + 1) * rows / groups);
        (lo, hi - lo)
    })
}

/// [`micro`] for `g` (1..=6) rows.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn micro_any<const W: u8>(g: usize, t: Tile) {
    match g {
        6 => micro::<6, W>(t),
        5 => micro::<5, W>(t),
        4 => micro::<4, W>(t),
        3 => micro::<3, W>(t),
        2 => micro::<2, W>(t),
        _ => micro1::<W>(t),
    }
}

/// 16 weights of an f32 or f16 panel at input position `c`, widened to f32.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn load_panel<const W: u8>(
    w: *const u8,
    c: usize,
) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    if W == WF16 {
        let p: *const __m128i = w.add(c * PANEL * 2).cast();
        (
            _mm256_cvtph_ps(_mm_loadu_si128(p)),
            _mm256_cvtph_ps(_mm_loadu_si128(p.add(1))),
        )
    } else {
        let p: *const f32 = w.add(c * PANEL * 4).cast();
        (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
    }
}

/// 16 weights of a bf16 panel at the input pair `c, c + 1` (`c` even), widened to f32: the
/// weights of input `c`, then of `c + 1`, each as features 0-7 and 8-15.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn load_pair(
    w: *const u8,
    c: usize,
) -> [(std::arch::x86_64::__m256, std::arch::x86_64::__m256); 2] {
    use std::arch::x86_64::*;
    let p: *const __m256i = w.add(c * PANEL * 2).cast();
    let (v0, v1) = (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)));
    let mask = _mm256_set1_epi32(-65536);
    // (No closures: they would not inherit the caller's target features.)
    [
        (
            _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)),
            _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)),
        ),
        (
            _mm256_castsi256_ps(_mm256_and_si256(v0, mask)),
            _mm256_castsi256_ps(_mm256_and_si256(v1, mask)),
        ),
    ]
}

/// Stores 16 outputs (`first`) or adds them to what is there.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn store16(
    o: *mut f32,
    v: (std::arch::x86_64::__m256, std::arch::x86_64::__m256),
    first: bool,
) {
    use std::arch::x86_64::*;
    let (mut v0, mut v1) = v;
    if !first {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(o));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(o.add(8)));
    }
    _mm256_storeu_ps(o, v0);
    _mm256_storeu_ps(o.add(8), v1);
}

/// `y[i][0..16] (+)= sum over c in c0..c1 of x[i * k + c] * panel[c][0..16]` for `R` rows:
/// 2R accumulators, each weight vector reused by every row.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn micro<const R: usize, const W: u8>(t: Tile) {
    use std::arch::x86_64::*;
    let Tile {
        x, k, w, y, ldy, ..
    } = t;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    // (A function, not a closure: a closure does not inherit the caller's target features,
    // and its intrinsics would be calls.)
    #[inline(always)]
    unsafe fn fma<const R: usize>(
        acc: &mut [[__m256; 2]; R],
        (w0, w1): (__m256, __m256),
        x: *const f32,
        k: usize,
        c: usize,
    ) {
        for (i, a) in acc.iter_mut().enumerate() {
            let b = _mm256_broadcast_ss(&*x.add(i * k + c));
            a[0] = _mm256_fmadd_ps(w0, b, a[0]);
            a[1] = _mm256_fmadd_ps(w1, b, a[1]);
        }
    }
    if W == WBF16 {
        let mut c = t.c0;
        while c < t.c1 {
            _mm_prefetch::<_MM_HINT_T0>(w.add(c * PANEL * 2 + PREFETCH_AHEAD).cast());
            let [lo, hi] = load_pair(w, c);
            fma(&mut acc, lo, x, k, c);
            if c + 1 < t.c1 {
                fma(&mut acc, hi, x, k, c + 1);
            }
            c += 2;
        }
    } else {
        let line = if W == WF32 { PANEL * 4 } else { PANEL * 2 };
        for c in t.c0..t.c1 {
            _mm_prefetch::<_MM_HINT_T0>(w.add(c * line + PREFETCH_AHEAD).cast());
            fma(&mut acc, load_panel::<W>(w, c), x, k, c);
        }
    }
    for (i, a) in acc.iter().enumerate() {
        store16(y.add(i * ldy), (a[0], a[1]), t.first);
    }
}

/// [`micro`] for one row (a decode token): four independent accumulator pairs over
/// consecutive input positions, so the weight stream is not held up by FMA latency.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn micro1<const W: u8>(t: Tile) {
    use std::arch::x86_64::*;
    let Tile {
        x,
        w,
        c0,
        c1,
        first,
        y,
        ..
    } = t;
    let mut acc = [_mm256_setzero_ps(); 8];
    // (A function, not a closure: see `micro`.)
    #[inline(always)]
    unsafe fn fma(acc: &mut [__m256; 8], u: usize, (w0, w1): (__m256, __m256), x: *const f32) {
        let b = _mm256_broadcast_ss(&*x);
        acc[2 * u] = _mm256_fmadd_ps(w0, b, acc[2 * u]);
        acc[2 * u + 1] = _mm256_fmadd_ps(w1, b, acc[2 * u + 1]);
    }
    // (c0 is even: a bf16 pair never straddles the unrolled loop and the tail.)
    let mut c = c0;
    while c + 4 <= c1 {
        if W == WBF16 {
            let ([a, b], [d, e]) = (load_pair(w, c), load_pair(w, c + 2));
            for (u, wv) in [a, b, d, e].into_iter().enumerate() {
                fma(&mut acc, u, wv, x.add(c + u));
            }
        } else {
            for u in 0..4 {
                fma(&mut acc, u, load_panel::<W>(w, c + u), x.add(c + u));
            }
        }
        c += 4;
    }
    while c < c1 {
        if W == WBF16 {
            let [a, b] = load_pair(w, c);
            fma(&mut acc, 0, a, x.add(c));
            if c + 1 < c1 {
                fma(&mut acc, 1, b, x.add(c + 1));
            }
            c += 2;
        } else {
            fma(&mut acc, 0, load_panel::<W>(w, c), x.add(c));
            c += 1;
        }
    }
    let v0 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[4], acc[6]));
    let v1 = _mm256_add_ps(_mm256_add_ps(acc[1], acc[3]), _mm256_add_ps(acc[5], acc[7]));
    store16(y, (v0, v1), first);
}

/// Matmuls on AMX tiles (bf16 weights, activations rounded to bf16, sums in f32).
///
/// A tile is 16 rows of 64 bytes. The weight panels are already the operand layout of
/// `tdpbf16ps`: a panel's 16 input pairs x 16 features are one 16 x 64-byte B tile, and 16
/// activation rows of 32 inputs (as bf16 pairs) are one A tile. Per pair of panels and block
/// of 32 rows, four tiles accumulate a 32 x 32 block of outputs over the whole input, loading
/// two A and two B tiles per 32 inputs (a 2 x 2 blocking: each tile loaded serves two
/// products). The tile instructions are written as inline assembly: Rust has no stable AMX
/// intrinsics.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod amx {
    use std::arch::asm;

    use super::{Strip, PANEL};

    /// The tile configuration: palette 1, tiles 0-7 each 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Whether the CPU has AMX tiles with bf16 and the OS lets this process use them (Linux
    /// hands out tile state only on request: `arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`,
    /// which holds for the whole process).
    pub(super) fn ready() -> bool {
        static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *READY.get_or_init(|| {
            // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
                return false;
            }
            request()
        })
    }

    #[cfg(target_os = "linux")]
    fn request() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a system call with integer arguments; it only changes which register state
        // the process may use.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn request() -> bool {
        false
    }

    /// `tileloadd tmmT, [p + stride * row]`.
    macro_rules! load {
        ($t:literal, $p:expr, $stride:expr) => {
            asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) $stride,
                options(nostack, readonly, preserves_flags))
        };
    }
    /// `tilestored [p + stride * row], tmmT`.
    macro_rules! store {
        ($t:literal, $p:expr, $stride:expr) => {
            asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $p, s = in(reg) $stride,
                options(nostack, preserves_flags))
        };
    }

    /// Panels `lo..hi` of `y[rows, n] = xb[rows, k] W^T`: `xb` the activations as bf16 pairs
    /// (`k / 2` per row, rows padded with zeros to a multiple of 32), `w` bf16 pair panels,
    /// `k` a multiple of 32.
    ///
    /// # Safety
    /// The CPU has AMX and [`ready`] returned true; `xb` holds the padded rows, `w` panels
    /// below `hi`, `y` rows below `rows` and columns of panels below `hi` below `n` (the
    /// caller's assert).
    pub(super) unsafe fn strip(s: Strip<'_>, w: *const u8) {
        let Strip {
            xb,
            rows,
            k,
            n,
            lo,
            hi,
            y,
            ..
        } = s;
        let lda = k * 2; // bytes per activation row
        let panel = k * PANEL * 2; // bytes per weight panel
        let ldy = n * 4;
        let xb: *const u8 = xb.as_ptr().cast();
        let mut scratch = [[0f32; PANEL]; 16];
        // A result tile to its rows and columns of `y`: straight there when whole, else through
        // the scratch tile.
        let mut put = |t: u8, r: usize, p: usize| {
            if r >= rows {
                return;
            }
            let (valid, cols) = ((rows - r).min(16), (n - p * PANEL).min(PANEL));
            let whole = valid == 16 && cols == PANEL;
            let (dst, stride) = if whole {
                (y.0.add(r * n + p * PANEL).cast::<u8>(), ldy)
            } else {
                (scratch.as_mut_ptr().cast::<u8>(), PANEL * 4)
            };
            match t {
                0 => store!("0", dst, stride),
                1 => store!("1", dst, stride),
                2 => store!("2", dst, stride),
                _ => store!("3", dst, stride),
            }
            if !whole {
                for (i, row) in scratch.iter().enumerate().take(valid) {
                    std::ptr::copy_nonoverlapping(
                        row.as_ptr(),
                        y.0.add((r + i) * n + p * PANEL),
                        cols,
                    );
                }
            }
        };
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags));
        let mut p = lo;
        while p < hi {
            let two = p + 1 < hi;
            let (b0, b1) = (w.add(p * panel), w.add((p + 1).min(hi - 1) * panel));
            for r in (0..rows).step_by(32) {
                let (a0, a1) = (xb.add(r * lda), xb.add((r + 16) * lda));
                // A block's second 16 rows, if any are real (one decode token: none).
                let lower = r + 16 < rows;
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem, preserves_flags)
                );
                for c in (0..k).step_by(32) {
                    // 32 inputs: 64 bytes of each activation row, 16 pair rows of a panel.
                    load!("4", a0.add(c * 2), lda);
                    load!("6", b0.add(c * 32), 64usize);
                    asm!(
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        options(nostack, nomem, preserves_flags)
                    );
                    if lower {
                        load!("5", a1.add(c * 2), lda);
                        asm!(
                            "tdpbf16ps tmm1, tmm5, tmm6",
                            options(nostack, nomem, preserves_flags)
                        );
                    }
                    if two {
                        load!("7", b1.add(c * 32), 64usize);
                        asm!(
                            "tdpbf16ps tmm2, tmm4, tmm7",
                            options(nostack, nomem, preserves_flags)
                        );
                        if lower {
                            asm!(
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                options(nostack, nomem, preserves_flags)
                            );
                        }
                    }
                }
                put(0, r, p);
                put(1, r + 16, p);
                if two {
                    put(2, r, p + 1);
                    put(3, r + 16, p + 1);
                }
            }
            p += 2;
        }
        asm!("tilerelease", options(nostack, nomem, preserves_flags));
    }
}

/// A bf16 is the top half of an f32: widening is a shift (vectorizes, unlike a call).
#[inline(always)]
fn widen(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// The portable attention's dot product: sixteen independent accumulators over fixed-size
/// chunks, so the compiler vectorizes it without bounds checks. With `FMA` (only inside a
/// `#[target_feature(enable = "fma")]` caller) it fuses the multiply-add; without, `mul_add`
/// would be a libm call, so it multiplies and adds.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let mut s = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    for (x, y) in ca.zip(cb) {
        let x: &[f32; 16] = x.try_into().expect("chunks of 16");
        let y: &[f32; 16] = y.try_into().expect("chunks of 16");
        for l in 0..16 {
            acc[l] = if FMA {
                x[l].mul_add(y[l], acc[l])
            } else {
                acc[l] + x[l] * y[l]
            };
        }
    }
    s + acc.iter().sum::<f32>()
}

/// The instruction sets the kernels are compiled for, best last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Simd {
    Portable,
    Avx2,
    Avx512,
    /// AVX-512 and AMX tiles (only bf16 matmuls of many rows use the tiles).
    Amx,
}

impl Simd {
    /// Every level this CPU can run (the tests run each).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut v = vec![Self::Portable];
        if has_avx2_fma() {
            v.push(Self::Avx2);
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512f") {
                v.push(Self::Avx512);
                if amx::ready() {
                    v.push(Self::Amx);
                }
            }
        }
        v
    }

    /// The best level the CPU has, or the one `DYN_NATIVE_ISA` (portable, avx2, avx512) caps
    /// it at, for comparing the kernels.
    fn best() -> Self {
        static BEST: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let best = Self::detect();
            let cap = match std::env::var("DYN_NATIVE_ISA").as_deref() {
                Ok("portable") => Self::Portable,
                Ok("avx2") => Self::Avx2,
                Ok("avx512") => Self::Avx512,
                _ => best,
            };
            best.min(cap)
        })
    }

    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2_fma() {
                return if !std::is_x86_feature_detected!("avx512f") {
                    Self::Avx2
                } else if amx::ready() {
                    Self::Amx
                } else {
                    Self::Avx512
                };
            }
        }
        Self::Portable
    }

    /// Whether the 16-lane kernels run.
    fn wide(self) -> bool {
        matches!(self, Self::Avx512 | Self::Amx)
    }
}

/// AVX2 with FMA and the f16 conversions (F16C): every x86 CPU with AVX2 that this runs on.
fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
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
/// Compiled with AVX2 and FMA when the CPU has them.
pub fn silu_mul(gate_up: &[f32], i: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time); the function is safe
            // Rust compiled with those features enabled.
            #[allow(unsafe_code)]
            unsafe {
                silu_mul_avx2(gate_up, i, out)
            };
            return;
        }
    }
    silu_mul_generic(gate_up, i, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_mul_avx2(gate_up: &[f32], i: usize, out: &mut [f32]) {
    silu_mul_generic(gate_up, i, out)
}

#[inline(always)]
fn silu_mul_generic(gate_up: &[f32], i: usize, out: &mut [f32]) {
    for (gu, o) in gate_up.chunks_exact(2 * i).zip(out.chunks_exact_mut(i)) {
        let (g, u) = gu.split_at(i);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            // sigmoid(g) from e^-|g| (never overflows; vectorizes, unlike `exp`).
            let e = exp_neg(-g.abs());
            let sig = if g >= 0.0 { 1.0 } else { e } / (1.0 + e);
            *o = g * sig * u;
        }
    }
}

/// An element type of the KV cache: f32, or f16 / bf16 widened to f32 as attention reads it.
#[allow(unsafe_code)]
pub trait KvElem: Copy + Send + Sync + 'static {
    /// Rounded to nearest (ties to even).
    fn narrow(v: f32) -> Self;
    fn widen(from: &[Self], to: &mut [f32]);
    /// 8 elements widened.
    ///
    /// # Safety
    /// `p..p + 8` is in bounds; called only inlined into a function with AVX2 and F16C
    /// enabled, on a CPU that has them.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// 16 elements widened.
    ///
    /// # Safety
    /// `p..p + 16` is in bounds; called only inlined into a function with AVX-512 enabled, on
    /// a CPU that has it.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

#[allow(unsafe_code)]
impl KvElem for f32 {
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn widen(from: &[Self], to: &mut [f32]) {
        to.copy_from_slice(from);
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

#[allow(unsafe_code)]
impl KvElem for f16 {
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline(always)]
    fn widen(from: &[Self], to: &mut [f32]) {
        for (t, f) in to.iter_mut().zip(from) {
            *t = f.to_f32();
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }
}

#[allow(unsafe_code)]
impl KvElem for bf16 {
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn widen(from: &[Self], to: &mut [f32]) {
        for (t, &f) in to.iter_mut().zip(from) {
            *t = widen(f);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())),
            16,
        ))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())),
            16,
        ))
    }
}

/// The query heads that share one kv head: `rep` heads of `hd` in `q`; scores are scaled by
/// `scale`.
#[derive(Clone, Copy)]
pub struct GroupQuery<'a> {
    pub q: &'a [f32],
    pub rep: usize,
    pub hd: usize,
    pub scale: f32,
}

/// One kv head's cached positions in a layer: position `t`'s K and V start at
/// `offsets[t] + head` in `k` and `v`.
#[derive(Clone, Copy)]
pub struct KvRows<'a, E = f32> {
    pub k: &'a [E],
    pub v: &'a [E],
    pub offsets: &'a [usize],
    pub head: usize,
}

/// Attention of a group of query heads over one kv head's cached positions, into `out`
/// (`rep x hd`). `next` optionally names the rows of the call likely to follow on this thread,
/// only to prefetch them. Runs the best kernel the CPU has.
pub fn attend<E: KvElem>(
    g: GroupQuery<'_>,
    kv: KvRows<'_, E>,
    out: &mut [f32],
    next: Option<KvRows<'_, E>>,
) {
    attend_with(g, kv, out, next, Simd::best())
}

/// [`attend`] with the kernels of one instruction set (one the CPU has).
fn attend_with<E: KvElem>(
    g: GroupQuery<'_>,
    kv: KvRows<'_, E>,
    out: &mut [f32],
    next: Option<KvRows<'_, E>>,
    simd: Simd,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if simd != Simd::Portable {
            let fits = |c: &[E]| kv.offsets.iter().all(|&o| o + kv.head + g.hd <= c.len());
            if g.hd.is_multiple_of(64)
                && g.q.len() >= g.rep * g.hd
                && out.len() >= g.rep * g.hd
                && fits(kv.k)
                && fits(kv.v)
            {
                // SAFETY: the CPU has AVX2 and FMA, and AVX-512 where `simd` says so (checked
                // at run time); the checks above bound every K/V row, query and output access
                // of the kernel.
                #[allow(unsafe_code)]
                unsafe {
                    if simd.wide() {
                        attend_avx512_64(g, kv, out, next)
                    } else {
                        attend_avx2_64(g, kv, out, next)
                    }
                };
                return;
            }
            // SAFETY: the CPU has AVX2 and FMA (checked at run time); the function is safe
            // Rust compiled with those features enabled.
            #[allow(unsafe_code)]
            unsafe {
                attend_avx2(g, kv, out)
            };
            return;
        }
    }
    attend_generic::<false, E>(g, kv, out)
}

/// Positions per tile of the value pass: their V rows (16 KiB at head_dim 64) stay in L1
/// while each query head and 64-lane slice of the head uses them.
const V_TILE: usize = 64;
/// Positions ahead of the first query head's pass that K rows are prefetched.
const PF_POS: usize = 32;

/// [`attend`] for head dims that are multiples of 64, with intrinsics:
/// - scores: per query head and 64-lane slice, the query slice stays in registers while each
///   position's K slice streams past; the partial sums of 8 positions are reduced together
///   (7 horizontal adds for 8 scores instead of a reduction each);
/// - values: per tile of positions, each query head accumulates a 64-lane slice of its output
///   in registers over the tile's V rows;
/// - memory: K rows are prefetched ahead of the first head's pass, V rows (into L2) during
///   the second, and `next`'s K rows (the pair this thread likely takes next) during the
///   value pass, so the memory stays busy through the whole call.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2_64<E: KvElem>(
    g: GroupQuery<'_>,
    kv: KvRows<'_, E>,
    out: &mut [f32],
    next: Option<KvRows<'_, E>>,
) {
    attend_64::<Ymm, E>(g, kv, out, next)
}

/// [`attend_avx2_64`] with 16-lane registers: half the loads and multiply-adds per head slice.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn attend_avx512_64<E: KvElem>(
    g: GroupQuery<'_>,
    kv: KvRows<'_, E>,
    out: &mut [f32],
    next: Option<KvRows<'_, E>>,
) {
    attend_64::<Zmm, E>(g, kv, out, next)
}

/// The register width of the attention kernel, for a 64-lane slice of a head: its query
/// slice held in registers, the dot product with a K slice (as 8 partial sums), and an
/// output slice accumulating V slices.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
trait Slice64 {
    type Regs: Copy;
    /// Query heads whose slices stay in registers together while a K row streams past (each
    /// K slice loaded and widened once for all of them).
    const HEADS: usize;
    /// Loads 64 floats. (All: raw pointers the caller keeps in bounds, and intrinsics only
    /// inlined into a function with the width's target features.)
    unsafe fn load(p: *const f32) -> Self::Regs;
    /// Loads 64 cache elements, widened.
    unsafe fn load_kv<E: KvElem>(p: *const E) -> Self::Regs;
    /// The 8-lane partial sums of `q . k`.
    unsafe fn dot_regs(q: &Self::Regs, k: &Self::Regs) -> std::arch::x86_64::__m256;

    /// `acc += p * v[..64]`.
    unsafe fn axpy(acc: &mut Self::Regs, p: f32, v: &Self::Regs);
    unsafe fn store(acc: &Self::Regs, p: *mut f32);
}

#[cfg(target_arch = "x86_64")]
struct Ymm;
#[cfg(target_arch = "x86_64")]
struct Zmm;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
impl Slice64 for Ymm {
    type Regs = [std::arch::x86_64::__m256; 8];
    // (8 registers a head of AVX2's 16: one at a time.)
    const HEADS: usize = 1;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::Regs {
        std::array::from_fn(|u| std::arch::x86_64::_mm256_loadu_ps(p.add(8 * u)))
    }
    #[inline(always)]
    unsafe fn load_kv<E: KvElem>(p: *const E) -> Self::Regs {
        [
            E::load8(p),
            E::load8(p.add(8)),
            E::load8(p.add(16)),
            E::load8(p.add(24)),
            E::load8(p.add(32)),
            E::load8(p.add(40)),
            E::load8(p.add(48)),
            E::load8(p.add(56)),
        ]
    }
    #[inline(always)]
    unsafe fn dot_regs(q: &Self::Regs, k: &Self::Regs) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let mut a0 = _mm256_mul_ps(q[0], k[0]);
        let mut a1 = _mm256_mul_ps(q[1], k[1]);
        for u in (2..8).step_by(2) {
            a0 = _mm256_fmadd_ps(q[u], k[u], a0);
            a1 = _mm256_fmadd_ps(q[u + 1], k[u + 1], a1);
        }
        _mm256_add_ps(a0, a1)
    }
    #[inline(always)]
    unsafe fn axpy(acc: &mut Self::Regs, p: f32, v: &Self::Regs) {
        use std::arch::x86_64::*;
        let p = _mm256_set1_ps(p);
        for (a, v) in acc.iter_mut().zip(v) {
            *a = _mm256_fmadd_ps(p, *v, *a);
        }
    }
    #[inline(always)]
    unsafe fn store(acc: &Self::Regs, p: *mut f32) {
        for (u, a) in acc.iter().enumerate() {
            std::arch::x86_64::_mm256_storeu_ps(p.add(8 * u), *a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
impl Slice64 for Zmm {
    type Regs = [std::arch::x86_64::__m512; 4];
    // (4 registers a head: four heads' queries, a K slice and the sums fit AVX-512's 32.)
    const HEADS: usize = 4;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::Regs {
        std::array::from_fn(|u| std::arch::x86_64::_mm512_loadu_ps(p.add(16 * u)))
    }
    #[inline(always)]
    unsafe fn load_kv<E: KvElem>(p: *const E) -> Self::Regs {
        [
            E::load16(p),
            E::load16(p.add(16)),
            E::load16(p.add(32)),
            E::load16(p.add(48)),
        ]
    }
    #[inline(always)]
    unsafe fn dot_regs(q: &Self::Regs, k: &Self::Regs) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let mut a0 = _mm512_mul_ps(q[0], k[0]);
        let mut a1 = _mm512_mul_ps(q[1], k[1]);
        a0 = _mm512_fmadd_ps(q[2], k[2], a0);
        a1 = _mm512_fmadd_ps(q[3], k[3], a1);
        let s = _mm512_castps_pd(_mm512_add_ps(a0, a1));
        _mm256_add_ps(
            _mm256_castpd_ps(_mm512_castpd512_pd256(s)),
            _mm256_castpd_ps(_mm512_extractf64x4_pd(s, 1)),
        )
    }
    #[inline(always)]
    unsafe fn axpy(acc: &mut Self::Regs, p: f32, v: &Self::Regs) {
        use std::arch::x86_64::*;
        let p = _mm512_set1_ps(p);
        for (a, v) in acc.iter_mut().zip(v) {
            *a = _mm512_fmadd_ps(p, *v, *a);
        }
    }
    #[inline(always)]
    unsafe fn store(acc: &Self::Regs, p: *mut f32) {
        for (u, a) in acc.iter().enumerate() {
            std::arch::x86_64::_mm512_storeu_ps(p.add(16 * u), *a);
        }
    }
}

/// The body of the 64-multiple attention kernels, over register width `L`.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn attend_64<L: Slice64, E: KvElem>(
    g: GroupQuery<'_>,
    kv: KvRows<'_, E>,
    out: &mut [f32],
    next: Option<KvRows<'_, E>>,
) {
    use std::arch::x86_64::*;
    let GroupQuery { q, rep, hd, scale } = g;
    let KvRows {
        k: kc,
        v: vc,
        offsets,
        head,
    } = kv;
    let span = offsets.len();
    let padded = span.div_ceil(8) * 8;
    let mut scores = vec![0f32; rep * padded];
    let (kp, vp, qp) = (kc.as_ptr(), vc.as_ptr(), q.as_ptr());
    // Prefetch addresses are formed with wrapping arithmetic (a hint may point anywhere; a
    // prefetch never faults).
    let prefetch_row = |p: *const E, near: bool| {
        for line in (0..hd).step_by(64 / std::mem::size_of::<E>()) {
            if near {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line).cast());
            } else {
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(line).cast());
            }
        }
    };
    // Scores: per query head and 64-lane slice of the head, the slice of q stays in 8
    // registers while every position's K slice streams past (one load per multiply-add);
    // each position's 8-lane partial sum is kept, and eight of them reduced together.
    let mut part = vec![_mm256_setzero_ps(); rep * padded];
    for c0 in (0..hd).step_by(64) {
        let mut j0 = 0;
        while j0 < rep {
            let g = (rep - j0).min(L::HEADS);
            let mut qv = [L::load(qp.add(j0 * hd + c0)); 4];
            for (i, q) in qv.iter_mut().enumerate().take(g).skip(1) {
                *q = L::load(qp.add((j0 + i) * hd + c0));
            }
            for (t, &o) in offsets.iter().enumerate() {
                // The memory traffic spread over the pass: K rows ahead, V rows into L2 for
                // the value pass.
                if c0 == 0 && j0 == 0 {
                    if let Some(&ahead) = offsets.get(t + PF_POS) {
                        prefetch_row(kp.wrapping_add(ahead + head), true);
                    }
                    prefetch_row(vp.wrapping_add(o + head), false);
                }
                let k = L::load_kv(kp.add(o + head + c0));
                for (i, q) in qv.iter().enumerate().take(g) {
                    let sum = L::dot_regs(q, &k);
                    let slot = &mut part[(j0 + i) * padded + t];
                    *slot = if c0 == 0 {
                        sum
                    } else {
                        _mm256_add_ps(*slot, sum)
                    };
                }
            }
            j0 += g;
        }
    }
    for j in 0..rep {
        // Eight 8-lane partial sums to one vector of eight totals (the padding stays zero).
        for (g, p) in part[j * padded..(j + 1) * padded]
            .chunks_exact(8)
            .enumerate()
        {
            let h01 = _mm256_hadd_ps(p[0], p[1]);
            let h23 = _mm256_hadd_ps(p[2], p[3]);
            let h45 = _mm256_hadd_ps(p[4], p[5]);
            let h67 = _mm256_hadd_ps(p[6], p[7]);
            let h0123 = _mm256_hadd_ps(h01, h23);
            let h4567 = _mm256_hadd_ps(h45, h67);
            let sum = _mm256_add_ps(
                _mm256_permute2f128_ps(h0123, h4567, 0x20),
                _mm256_permute2f128_ps(h0123, h4567, 0x31),
            );
            _mm256_storeu_ps(
                scores.as_mut_ptr().add(j * padded + 8 * g),
                _mm256_mul_ps(sum, _mm256_set1_ps(scale)),
            );
        }
    }
    for j in 0..rep {
        softmax(&mut scores[j * padded..j * padded + span]);
    }
    out[..rep * hd].fill(0.0);
    let op = out.as_mut_ptr();
    let mut t0 = 0;
    while t0 < span {
        let t1 = (t0 + V_TILE).min(span);
        // Per group of query heads and 64-lane slice: their outputs accumulate in registers
        // while each V slice is loaded (and widened) once for all of them.
        for c0 in (0..hd).step_by(64) {
            let mut j0 = 0;
            while j0 < rep {
                let g = (rep - j0).min(L::HEADS);
                let mut acc = [L::load(op.add(j0 * hd + c0)); 4];
                for (i, a) in acc.iter_mut().enumerate().take(g).skip(1) {
                    *a = L::load(op.add((j0 + i) * hd + c0));
                }
                for (t, &row) in offsets.iter().enumerate().take(t1).skip(t0) {
                    // Meanwhile the next task's K rows come into L2.
                    if let (0, 0, Some(n)) = (j0, c0, next) {
                        if let Some(&o) = n.offsets.get(t) {
                            prefetch_row(n.k.as_ptr().wrapping_add(o + n.head), false);
                        }
                    }
                    let v = L::load_kv(vp.add(row + head + c0));
                    for (i, a) in acc.iter_mut().enumerate().take(g) {
                        L::axpy(a, *scores.as_ptr().add((j0 + i) * padded + t), &v);
                    }
                }
                for (i, a) in acc.iter().enumerate().take(g) {
                    L::store(a, op.add((j0 + i) * hd + c0));
                }
                j0 += g;
            }
        }
        t0 = t1;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2<E: KvElem>(g: GroupQuery<'_>, kv: KvRows<'_, E>, out: &mut [f32]) {
    attend_generic::<true, E>(g, kv, out)
}

#[inline(always)]
fn attend_generic<const FMA: bool, E: KvElem>(
    g: GroupQuery<'_>,
    kv: KvRows<'_, E>,
    out: &mut [f32],
) {
    let GroupQuery { q, rep, hd, scale } = g;
    let KvRows {
        k: kc,
        v: vc,
        offsets,
        head,
    } = kv;
    let span = offsets.len();
    let mut scores = vec![0f32; rep * span];
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { c + a * b };
    // A row widened to f32 (a copy for f32).
    let mut wide = vec![0f32; hd];
    for (t, &row) in offsets.iter().enumerate() {
        let off = row + head;
        E::widen(&kc[off..off + hd], &mut wide);
        for j in 0..rep {
            let sum = dot::<FMA>(&q[j * hd..(j + 1) * hd], &wide);
            scores[j * span + t] = sum * scale;
        }
    }
    for j in 0..rep {
        softmax(&mut scores[j * span..(j + 1) * span]);
    }
    out.fill(0.0);
    for (t, &row) in offsets.iter().enumerate() {
        let off = row + head;
        E::widen(&vc[off..off + hd], &mut wide);
        for j in 0..rep {
            let p = scores[j * span + t];
            for (o, x) in out[j * hd..(j + 1) * hd].iter_mut().zip(&wide) {
                *o = madd(p, *x, *o);
            }
        }
    }
}

/// `e^x` for `x <= 0` to ~1e-7 relative (Cephes' range reduction and polynomial), in plain
/// arithmetic the compiler vectorizes (`f32::exp` is a libm call per element). The integer
/// part is rounded and taken out of the float by adding 1.5 * 2^23 (it lands in the low
/// mantissa bits): an `as i32` cast saturates, which compiles to scalar code per lane.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n (in -126..=0) as an integer, then 2^n built from its exponent bits.
    let n_int = t.to_bits().wrapping_sub(SHIFT.to_bits());
    e * f32::from_bits(n_int.wrapping_add(127) << 23)
}

/// In-place, numerically stable softmax with [`exp_neg`] (inlined into the caller's target
/// features).
#[inline(always)]
fn softmax(x: &mut [f32]) {
    // Each pass on its own so each vectorizes: a running sum in the exp loop would serialize
    // it (float addition is not reassociated).
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (m, v) in m.iter_mut().zip(c) {
            *m = m.max(*v);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&m)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for v in x.iter_mut() {
        *v = exp_neg(*v - max);
    }
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let sum = chunks.remainder().iter().sum::<f32>() + acc.iter().sum::<f32>();
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
        // 300 outputs: a zero-padded last panel; k = 600: several input blocks accumulated;
        // odd k: no vector alignment; rows cover one token, uneven row groups and prefill.
        for (n, k) in [(300, 72), (300, 70), (64, 600), (37, 9)] {
            check_linear(n, k);
        }
    }

    /// Attention in f64 over the same cache rows.
    fn naive_attend(g: GroupQuery<'_>, kv: KvRows<'_>) -> Vec<f32> {
        let (hd, head) = (g.hd, kv.head);
        let mut out = vec![0f32; g.rep * hd];
        for j in 0..g.rep {
            let s: Vec<f64> = kv
                .offsets
                .iter()
                .map(|&o| {
                    (0..hd)
                        .map(|d| g.q[j * hd + d] as f64 * kv.k[o + head + d] as f64)
                        .sum::<f64>()
                        * g.scale as f64
                })
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd {
                let v: f64 = kv
                    .offsets
                    .iter()
                    .zip(&e)
                    .map(|(&o, p)| p / sum * kv.v[o + head + d] as f64)
                    .sum();
                out[j * hd + d] = v as f32;
            }
        }
        out
    }

    #[test]
    fn attention_matches_a_float64_reference() {
        // Head dims 64 and 128 take the AVX2 kernel (where the CPU has it), 16 the portable
        // one; spans around the 8-position groups and the 64-position value tiles; rows
        // scattered over blocks in reverse order, at a kv head other than the first.
        let (bs, kv_heads) = (16, 2);
        for hd in [16, 64, 128] {
            // (5 query heads: a group of 4 held together in AVX-512 registers, and one more.)
            for rep in [1, 3, 5] {
                for span in [1usize, 7, 8, 9, 70, 170] {
                    let blocks = span.div_ceil(bs);
                    let len = blocks * kv_heads * bs * hd;
                    let val =
                        |i: usize, m: usize| ((i * 7919 % m) as f32 - m as f32 / 2.0) / m as f32;
                    let kc: Vec<f32> = (0..len).map(|i| val(i, 97) * 4.0).collect();
                    let vc: Vec<f32> = (0..len).map(|i| val(i, 89)).collect();
                    let q: Vec<f32> = (0..rep * hd).map(|i| val(i + 5, 83)).collect();
                    let offsets: Vec<usize> = (0..span)
                        .map(|t| ((blocks - 1 - t / bs) * kv_heads * bs + t % bs) * hd)
                        .collect();
                    let group = GroupQuery {
                        q: &q,
                        rep,
                        hd,
                        scale: 1.0 / (hd as f32).sqrt(),
                    };
                    let kv = KvRows {
                        k: &kc,
                        v: &vc,
                        offsets: &offsets,
                        head: bs * hd,
                    };
                    let want = naive_attend(group, kv);
                    for simd in Simd::available() {
                        let mut out = vec![f32::NAN; rep * hd];
                        let next = Some(KvRows { head: 0, ..kv });
                        attend_with(group, kv, &mut out, next, simd);
                        for (a, b) in out.iter().zip(&want) {
                            assert!(
                                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                                "hd {hd} rep {rep} span {span} {simd:?}: {a} vs {b}"
                            );
                        }
                    }
                    // A half-precision cache: the same attention over the rounded values.
                    check_half_attend::<f16>(group, kv, "f16");
                    check_half_attend::<bf16>(group, kv, "bf16");
                }
            }
        }
    }

    /// Attention over K and V narrowed to `E` agrees with the f64 reference over the same
    /// narrowed values, on every instruction set.
    fn check_half_attend<E: KvElem>(g: GroupQuery<'_>, kv: KvRows<'_>, dtype: &str) {
        let narrow = |v: &[f32]| v.iter().map(|&x| E::narrow(x)).collect::<Vec<E>>();
        let (kn, vn) = (narrow(kv.k), narrow(kv.v));
        let wide = |v: &[E]| {
            let mut w = vec![0f32; v.len()];
            E::widen(v, &mut w);
            w
        };
        let (kw, vw) = (wide(&kn), wide(&vn));
        let want = naive_attend(
            g,
            KvRows {
                k: &kw,
                v: &vw,
                ..kv
            },
        );
        let rows = KvRows {
            k: &kn[..],
            v: &vn[..],
            offsets: kv.offsets,
            head: kv.head,
        };
        for simd in Simd::available() {
            let mut out = vec![f32::NAN; g.rep * g.hd];
            attend_with(g, rows, &mut out, Some(KvRows { head: 0, ..rows }), simd);
            for (a, b) in out.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{dtype} cache, hd {} rep {} span {} {simd:?}: {a} vs {b}",
                    g.hd,
                    g.rep,
                    kv.offsets.len()
                );
            }
        }
    }

    fn check_linear(n: usize, k: usize) {
        // Weights and inputs exact in bf16 and f16: every path computes the same products, so
        // only the order of the sums differs.
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        for rows in [1, 3, 8, 9, 40, 100] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 16.0)
                .collect();
            let want = naive(&x, rows, &w, n, k);
            for compute in [Compute::F32, Compute::Bf16, Compute::F16] {
                let lin = Linear::new(n, k, w.clone(), None, compute);
                for simd in Simd::available() {
                    let mut y = vec![0f32; rows * n];
                    lin.forward_with(&x, rows, &mut y, simd);
                    for (a, b) in y.iter().zip(&want) {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{n}x{k}, rows {rows}, {compute:?}, {simd:?}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_vector_bf16_rounding_is_the_scalar_one() {
        #[cfg(target_arch = "x86_64")]
        if has_avx512_bf16() {
            // Ties both ways, values just either side of them, signs, zeros, large and tiny
            // normals; 70 values: two whole vectors and a tail.
            let mut x: Vec<f32> = vec![
                1.003_906_3,
                1.011_718_8,
                -1.003_906_3,
                0.0,
                -0.0,
                3.0e38,
                1.0e-37,
            ];
            x.extend(
                (0..63)
                    .map(|i| ((i * 7919 % 1013) as f32 - 506.3) / 97.1 * (1.0 + i as f32 * 1e-3)),
            );
            let (mut a, mut b) = (vec![0u32; 35], vec![0u32; 35]);
            bf16_row(&x, &mut a);
            // SAFETY: checked above.
            #[allow(unsafe_code)]
            unsafe {
                bf16_row_avx512(&x, &mut b)
            };
            assert_eq!(a, b);
        }
    }

    #[test]
    fn half_weights_round_as_documented() {
        // Values no half type holds exactly: f16 and bf16 weights are rounded to nearest; the
        // bf16 dot product rounds the inputs too, the other paths keep them in f32.
        // Shapes: odd inputs (never AMX); whole tiles of inputs with a partial block of rows,
        // a partial panel, an odd panel count, one row (AMX where the CPU has it).
        for (n, k, rows) in [
            (40, 301, 5),
            (40, 320, 37),
            (300, 96, 100),
            (16, 64, 16),
            (48, 64, 1),
        ] {
            check_rounding(n, k, rows);
        }
    }

    fn check_rounding(n: usize, k: usize, rows: usize) {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.3) / 997.1)
            .collect();
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 104_729 % 877) as f32 - 438.7) / 311.9)
            .collect();
        type Round = fn(f32) -> f32;
        let round = |v: &[f32], to: Round| v.iter().map(|&a| to(a)).collect::<Vec<_>>();
        let bf: Round = |a| bf16::from_f32(a).to_f32();
        let hf: Round = |a| f16::from_f32(a).to_f32();
        for compute in [Compute::Bf16, Compute::F16] {
            let lin = Linear::new(n, k, w.clone(), None, compute);
            for simd in Simd::available() {
                let dp = compute == Compute::Bf16 && simd == Simd::Amx && amx_fits(&lin.w, rows, k);
                let want = match compute {
                    Compute::F16 => naive(&x, rows, &round(&w, hf), n, k),
                    _ if dp => naive(&round(&x, bf), rows, &round(&w, bf), n, k),
                    _ => naive(&x, rows, &round(&w, bf), n, k),
                };
                let mut y = vec![0f32; rows * n];
                lin.forward_with(&x, rows, &mut y, simd);
                for (a, b) in y.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{n}x{k}, rows {rows}, {compute:?}, {simd:?}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
