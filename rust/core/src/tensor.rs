//! `Matrix`: an owned row-major weight matrix `[rows, cols]` in f32, f16 or bf16, and the
//! row-level operations the model needs (dot with a vector, AXPY of a row into a vector).
//! Rows are the output features (PyTorch `[out, in]` layout), so a GEMV reads rows contiguously.

use half::{bf16, f16};
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::team::{current_threads, par_chunks, par_ranges, par_tasks, SendPtr};

use crate::kernels::kernels;
use crate::quant::{
    self, quant_kernels, BlockQ4_0, BlockQ4_0x16, BlockQ8_0, BlockQ8_0x16, Interleaved16, Planar,
    PlanarBlock,
};

/// Weights per quantization block (Q8_0 and Q4_0).
pub const QBLOCK: usize = 32;

thread_local! {
    /// The Q8_0-quantized input vector of the current quantized GEMV (reused, never shrunk).
    static XQ: std::cell::RefCell<Vec<BlockQ8_0>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Blocks of one row taken out of the interleaved Q4_0x16 layout (reused).
    static ROWQ: std::cell::RefCell<Vec<BlockQ4_0>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Blocks of one row taken out of the interleaved Q8_0x16 layout (reused).
    static ROWQ8: std::cell::RefCell<Vec<BlockQ8_0>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The plan of the current single-call planar `sparse_axpy` (reused).
    static DOWN_PLAN: std::cell::RefCell<DownPlan> = const { std::cell::RefCell::new(DownPlan::new()) };
    /// Input block sums of the current single-call quantized `dot_rows` (reused).
    static XSUM: std::cell::RefCell<Vec<i32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The quantized input and its block sums of the calling thread's current quantized
    /// `matvec` (reused: decode runs ~160 of them per token).
    static GEMV_IN: std::cell::RefCell<(Vec<BlockQ8_0>, Vec<i32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// One claim's outputs of a column block after the first in `matvec_blocks` (reused).
    static BLOCK_OUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Storage precision of weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// GGUF Q8_0: blocks of 32 int8 codes + f16 scale (34 bytes / 32 weights).
    Q8_0,
    /// GGUF Q4_0: blocks of 32 4-bit codes + f16 scale (18 bytes / 32 weights).
    Q4_0,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
        }
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8_0 | DType::Q4_0)
    }

    /// Bytes of `n` weights (`n` a multiple of 32 for quantized types).
    pub fn bytes(self, n: usize) -> usize {
        match self {
            DType::F32 => 4 * n,
            DType::F16 | DType::BF16 => 2 * n,
            DType::Q8_0 => n / QBLOCK * 34,
            DType::Q4_0 => n / QBLOCK * 18,
        }
    }
}

/// The element buffer of a matrix.
#[derive(Debug, Clone)]
pub enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    Q8_0(Vec<BlockQ8_0>),
    Q4_0(Vec<BlockQ4_0>),
    /// Q4_0 rows interleaved 16 at a time for the 16-row GEMV kernel, `[rows/16][cols/32]`
    /// (see `BlockQ4_0x16`); same values and bytes as `Q4_0`. Only where the kernel exists.
    Q4_0x16(Vec<BlockQ4_0x16>),
    /// Q8_0 rows interleaved 16 at a time (see `BlockQ8_0x16`); same values as `Q8_0`.
    Q8_0x16(Vec<BlockQ8_0x16>),
    /// Q4_0 rows with scales and codes in separate arrays (`quant::Planar`), for the int8
    /// down-projection kernel (`Matrix::into_down_layout`); same bytes as `Q4_0`.
    Q4_0P(Planar<[u8; 16]>),
    /// Planar Q8_0 (codes stored + 128); same values as `Q8_0`.
    Q8_0P(Planar<[u8; 32]>),
}

/// Row-major `[rows, cols]` weights.
#[derive(Debug, Clone)]
pub struct Matrix {
    // crate-private: the kernels trust `data` to hold `rows × cols` values in its layout, which
    // only the constructors guarantee
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) data: Storage,
}

impl Matrix {
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The stored values, in their layout.
    pub fn storage(&self) -> &Storage {
        &self.data
    }

    /// The stored values, taken out of the matrix.
    pub fn into_storage(self) -> Storage {
        self.data
    }

    /// Build from f32 values, stored as `dtype` (round to nearest even; quantized types per
    /// row, in parallel). A quantized dtype needs `cols % 32 == 0`; other matrices stay f32.
    pub fn from_f32(rows: usize, cols: usize, v: &[f32], dtype: DType) -> Matrix {
        assert!(
            rows.checked_mul(cols) == Some(v.len()),
            "Matrix::from_f32: {} values for {rows} x {cols}",
            v.len()
        );
        let dtype = if dtype.is_quantized() && !cols.is_multiple_of(QBLOCK) {
            DType::F32
        } else {
            dtype
        };
        let nb = cols / QBLOCK;
        let data = match dtype {
            DType::F32 => Storage::F32(v.to_vec()),
            DType::F16 => Storage::F16(v.par_iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => Storage::BF16(v.par_iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::Q8_0 => {
                let mut q = vec![BlockQ8_0::default(); rows * nb];
                q.par_chunks_mut(nb.max(1))
                    .zip(v.par_chunks(cols.max(1)))
                    .for_each(|(o, x)| {
                        quant::quantize_row_q8_0(x, o).expect("cols is a multiple of 32");
                    });
                Storage::Q8_0(q)
            }
            DType::Q4_0 => {
                let mut q = vec![BlockQ4_0::default(); rows * nb];
                q.par_chunks_mut(nb.max(1))
                    .zip(v.par_chunks(cols.max(1)))
                    .for_each(|(o, x)| {
                        quant::quantize_row_q4_0(x, o).expect("cols is a multiple of 32");
                    });
                Storage::Q4_0(q)
            }
        };
        Matrix { rows, cols, data }
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
            Storage::Q8_0(_) | Storage::Q8_0x16(_) | Storage::Q8_0P(_) => DType::Q8_0,
            Storage::Q4_0(_) | Storage::Q4_0x16(_) | Storage::Q4_0P(_) => DType::Q4_0,
        }
    }

    /// Whether the rows are in a 16-row interleaved GEMV layout (`into_gemv_layout`).
    pub fn is_interleaved(&self) -> bool {
        matches!(self.data, Storage::Q4_0x16(_) | Storage::Q8_0x16(_))
    }

    /// Bytes held by the weights.
    pub fn nbytes(&self) -> usize {
        self.dtype().bytes(self.rows * self.cols)
    }

    /// `row[r] · x` (`x.len() == cols`). Quantized rows quantize `x` on each call: for many
    /// rows against one `x`, use `dot_rows`.
    #[inline]
    pub fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        let mut out = [0f32];
        self.dot_rows(r, x, &mut out);
        out[0]
    }

    /// `out[i] = row[r0 + i] · x` (`x.len() == cols`); `x` is quantized once if needed.
    pub fn dot_rows(&self, r0: usize, x: &[f32], out: &mut [f32]) {
        debug_assert_eq!(x.len(), self.cols);
        let k = kernels();
        let c = self.cols;
        match &self.data {
            Storage::F32(w) => out
                .iter_mut()
                .enumerate()
                .for_each(|(i, o)| *o = (k.dot_f32)(&w[(r0 + i) * c..(r0 + i + 1) * c], x)),
            Storage::F16(w) => out
                .iter_mut()
                .enumerate()
                .for_each(|(i, o)| *o = (k.dot_f16)(&w[(r0 + i) * c..(r0 + i + 1) * c], x)),
            Storage::BF16(w) => out
                .iter_mut()
                .enumerate()
                .for_each(|(i, o)| *o = (k.dot_bf16)(&w[(r0 + i) * c..(r0 + i + 1) * c], x)),
            Storage::Q8_0(_)
            | Storage::Q4_0(_)
            | Storage::Q4_0x16(_)
            | Storage::Q8_0x16(_)
            | Storage::Q4_0P(_)
            | Storage::Q8_0P(_) => XQ.with(|cell| {
                let mut xq = cell.borrow_mut();
                quantize_input(x, &mut xq);
                XSUM.with(|xs| {
                    let mut xs = xs.borrow_mut();
                    self.input_sums(&xq, &mut xs);
                    self.dot_rows_q(r0, &xq, &xs, out);
                })
            }),
        }
    }

    /// `out[i] = row[r0 + i] · xq` for a quantized matrix and a Q8_0 input; `xs` is
    /// [`Self::input_sums`] of `xq` (empty unless the layout is interleaved).
    fn dot_rows_q(&self, r0: usize, xq: &[BlockQ8_0], xs: &[i32], out: &mut [f32]) {
        let qk = quant_kernels();
        let nb = self.cols / QBLOCK;
        match &self.data {
            Storage::Q8_0(w) => out.iter_mut().enumerate().for_each(|(i, o)| {
                *o = (qk.vec_dot_q8_0_q8_0)(&w[(r0 + i) * nb..(r0 + i + 1) * nb], xq)
            }),
            Storage::Q4_0(w) => out.iter_mut().enumerate().for_each(|(i, o)| {
                *o = (qk.vec_dot_q4_0_q8_0)(&w[(r0 + i) * nb..(r0 + i + 1) * nb], xq)
            }),
            Storage::Q4_0x16(w) => gemv16_rows(
                w,
                nb,
                r0,
                xq,
                xs,
                out,
                qk.gemv16_q4_0.expect("Q4_0x16 exists only with its kernel"),
                |r| with_row16(w, nb, r, 0, nb, &ROWQ, |b| (qk.vec_dot_q4_0_q8_0)(b, xq)),
            ),
            Storage::Q8_0x16(w) => gemv16_rows(
                w,
                nb,
                r0,
                xq,
                xs,
                out,
                qk.gemv16_q8_0.expect("Q8_0x16 exists only with its kernel"),
                |r| with_row16(w, nb, r, 0, nb, &ROWQ8, |b| (qk.vec_dot_q8_0_q8_0)(b, xq)),
            ),
            Storage::Q4_0P(p) => out.iter_mut().enumerate().for_each(|(i, o)| {
                *o = with_planar_row(p, nb, r0 + i, 0, nb, &ROWQ, |b| {
                    (qk.vec_dot_q4_0_q8_0)(b, xq)
                })
            }),
            Storage::Q8_0P(p) => out.iter_mut().enumerate().for_each(|(i, o)| {
                *o = with_planar_row(p, nb, r0 + i, 0, nb, &ROWQ8, |b| {
                    (qk.vec_dot_q8_0_q8_0)(b, xq)
                })
            }),
            _ => unreachable!("dot_rows_q on a float matrix"),
        }
    }

    /// The per-block input terms the 16-row kernels subtract, into `xs` (cleared otherwise):
    /// `8 · Σ x` for Q4_0x16 (codes offset by 8), `128 · Σ x` for Q8_0x16 (codes stored + 128).
    pub(crate) fn input_sums(&self, xq: &[BlockQ8_0], xs: &mut Vec<i32>) {
        xs.clear();
        let mult = match self.data {
            Storage::Q4_0x16(_) => 8,
            Storage::Q8_0x16(_) => 128,
            _ => return,
        };
        xs.extend(
            xq.iter()
                .map(|b| mult * b.qs.iter().map(|&v| v as i32).sum::<i32>()),
        );
    }

    /// Interleave a Q8_0/Q4_0 matrix 16 rows at a time for the 16-row GEMV kernel when this CPU
    /// has it, `rows % 16 == 0` and `SPARSELM_INTERLEAVE` is not 0 (in parallel); other
    /// matrices are returned unchanged. For matrices used by GEMV and prompt GEMM only (their
    /// AXPY and f32 prompt paths take rows out one by one).
    pub fn into_gemv_layout(self) -> Matrix {
        let (rows, cols) = (self.rows, self.cols);
        let eligible = rows.is_multiple_of(16)
            && rows > 0
            && cols >= QBLOCK
            && crate::quant::interleave_enabled();
        let nb = cols / QBLOCK;
        let data = match self.data {
            Storage::Q4_0(w) if eligible && quant_kernels().gemv16_q4_0.is_some() => {
                Storage::Q4_0x16(repack_in_place(w, nb, BlockQ4_0x16::pack))
            }
            Storage::Q8_0(w) if eligible && quant_kernels().gemv16_q8_0.is_some() => {
                Storage::Q8_0x16(repack_in_place(w, nb, BlockQ8_0x16::pack))
            }
            data => data,
        };
        Matrix { rows, cols, data }
    }

    /// A new matrix of the listed rows (in that order), for the plain layouts (before
    /// `into_gemv_layout` / `into_down_layout`).
    pub fn select_rows(&self, rows: impl Iterator<Item = usize> + Clone) -> Matrix {
        let n = rows.clone().count();
        let c = self.cols;
        let nb = c / QBLOCK;
        fn pick<T: Copy>(v: &[T], w: usize, rows: impl Iterator<Item = usize>) -> Vec<T> {
            rows.flat_map(|r| v[r * w..(r + 1) * w].iter().copied())
                .collect()
        }
        let data = match &self.data {
            Storage::F32(v) => Storage::F32(pick(v, c, rows)),
            Storage::F16(v) => Storage::F16(pick(v, c, rows)),
            Storage::BF16(v) => Storage::BF16(pick(v, c, rows)),
            Storage::Q8_0(v) => Storage::Q8_0(pick(v, nb, rows)),
            Storage::Q4_0(v) => Storage::Q4_0(pick(v, nb, rows)),
            _ => unreachable!("select_rows on a repacked layout"),
        };
        Matrix {
            rows: n,
            cols: c,
            data,
        }
    }

    /// The columns of a float matrix cut into blocks of `block` columns (the last may be
    /// narrower): block `b` is `[rows, cols_b]` with columns `b·block..`. For the dense float
    /// `W_down` ([`matvec_blocks`]); quantized matrices are not cut (their blocks of 32 would
    /// have to be kept whole) and come back as the only block.
    pub fn split_cols(self, block: usize) -> Vec<Matrix> {
        let (rows, cols) = (self.rows, self.cols);
        let block = block.max(1);
        if cols <= block || self.dtype().is_quantized() {
            return vec![self];
        }
        fn cut<T: Copy>(v: &[T], rows: usize, cols: usize, c0: usize, c1: usize) -> Vec<T> {
            (0..rows)
                .flat_map(|r| v[r * cols + c0..r * cols + c1].iter().copied())
                .collect()
        }
        (0..cols)
            .step_by(block)
            .map(|c0| {
                let c1 = (c0 + block).min(cols);
                let data = match &self.data {
                    Storage::F32(v) => Storage::F32(cut(v, rows, cols, c0, c1)),
                    Storage::F16(v) => Storage::F16(cut(v, rows, cols, c0, c1)),
                    Storage::BF16(v) => Storage::BF16(cut(v, rows, cols, c0, c1)),
                    _ => unreachable!("quantized matrices are returned whole above"),
                };
                Matrix {
                    rows,
                    cols: c1 - c0,
                    data,
                }
            })
            .collect()
    }

    /// Split a Q4_0 / Q8_0 matrix into the planar layout of the int8 down-projection kernel
    /// (`quant::Planar`) when this CPU has that kernel; other matrices are returned unchanged.
    /// For the transposed down projection, whose decode path is [`Self::sparse_axpy`].
    pub fn into_down_layout(self) -> Matrix {
        let (rows, cols) = (self.rows, self.cols);
        let data = match self.data {
            Storage::Q4_0(w) if quant_kernels().down_q4_0.is_some() => {
                Storage::Q4_0P(Planar::from_blocks(&w, rows, cols / QBLOCK))
            }
            Storage::Q8_0(w) if quant_kernels().down_q8_0.is_some() => {
                Storage::Q8_0P(Planar::from_blocks(&w, rows, cols / QBLOCK))
            }
            data => data,
        };
        Matrix { rows, cols, data }
    }

    /// Whether the rows are in the planar layout of the int8 down kernel
    /// (`into_down_layout`); its sums go through [`DownPlan`]s.
    pub fn is_planar(&self) -> bool {
        matches!(self.data, Storage::Q4_0P(_) | Storage::Q8_0P(_))
    }

    /// Ask the CPU to start loading row `r` into cache (a hint; no effect on results). Used by
    /// the sparse down projection, whose scattered rows defeat the hardware prefetcher.
    #[inline]
    pub fn prefetch_row(&self, r: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            if r >= self.rows {
                return;
            }
            let (ptr, len): (*const u8, usize) = match &self.data {
                Storage::F32(w) => (w[r * self.cols..].as_ptr().cast(), self.cols * 4),
                Storage::F16(w) => (w[r * self.cols..].as_ptr().cast(), self.cols * 2),
                Storage::BF16(w) => (w[r * self.cols..].as_ptr().cast(), self.cols * 2),
                Storage::Q8_0(w) => {
                    let nb = self.cols / QBLOCK;
                    (
                        w[r * nb..].as_ptr().cast(),
                        nb * std::mem::size_of::<BlockQ8_0>(),
                    )
                }
                Storage::Q4_0(w) => {
                    let nb = self.cols / QBLOCK;
                    (
                        w[r * nb..].as_ptr().cast(),
                        nb * std::mem::size_of::<BlockQ4_0>(),
                    )
                }
                // rows are interleaved; these matrices are not used by AXPY paths
                Storage::Q4_0x16(_) | Storage::Q8_0x16(_) => return,
                // planar groups are read front to back (hardware prefetch)
                Storage::Q4_0P(_) | Storage::Q8_0P(_) => return,
            };
            let mut off = 0;
            while off < len {
                // SAFETY: prefetch is a hint that never faults; the address lies inside the row
                // (r < rows), and wrapping_add makes no in-bounds claim anyway.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        ptr.wrapping_add(off) as *const i8,
                    )
                };
                off += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = r;
    }

    /// `y += a · row[r][c0 .. c0 + y.len()]` (for quantized rows `c0` and `y.len()` are
    /// multiples of 32).
    #[inline]
    pub fn axpy_row(&self, r: usize, c0: usize, a: f32, y: &mut [f32]) {
        let k = kernels();
        let s = r * self.cols + c0;
        let e = s + y.len();
        match &self.data {
            Storage::F32(w) => (k.axpy_f32)(a, &w[s..e], y),
            Storage::F16(w) => (k.axpy_f16)(a, &w[s..e], y),
            Storage::BF16(w) => (k.axpy_bf16)(a, &w[s..e], y),
            Storage::Q8_0(w) => (quant_kernels().axpy_q8_0)(a, &w[s / QBLOCK..e / QBLOCK], y),
            Storage::Q4_0(w) => (quant_kernels().axpy_q4_0)(a, &w[s / QBLOCK..e / QBLOCK], y),
            Storage::Q4_0x16(w) => {
                let nbr = self.cols / QBLOCK;
                with_row16(w, nbr, r, c0 / QBLOCK, y.len() / QBLOCK, &ROWQ, |b| {
                    (quant_kernels().axpy_q4_0)(a, b, y)
                })
            }
            Storage::Q8_0x16(w) => {
                let nbr = self.cols / QBLOCK;
                with_row16(w, nbr, r, c0 / QBLOCK, y.len() / QBLOCK, &ROWQ8, |b| {
                    (quant_kernels().axpy_q8_0)(a, b, y)
                })
            }
            Storage::Q4_0P(p) => {
                let nbr = self.cols / QBLOCK;
                with_planar_row(p, nbr, r, c0 / QBLOCK, y.len() / QBLOCK, &ROWQ, |b| {
                    (quant_kernels().axpy_q4_0)(a, b, y)
                })
            }
            Storage::Q8_0P(p) => {
                let nbr = self.cols / QBLOCK;
                with_planar_row(p, nbr, r, c0 / QBLOCK, y.len() / QBLOCK, &ROWQ8, |b| {
                    (quant_kernels().axpy_q8_0)(a, b, y)
                })
            }
        }
    }

    /// `y += Σ_i a[i] · row[r[i]]` over eight whole rows in one pass over `y` (quantized
    /// layouts, which have no eight-row kernel, one row at a time).
    #[inline]
    fn axpy_rows8(&self, r: [usize; 8], a: &[f32; 8], y: &mut [f32]) {
        let k = kernels();
        let c = self.cols;
        match &self.data {
            Storage::F32(w) => (k.axpy8_f32)(a, r.map(|j| &w[j * c..(j + 1) * c]), y),
            Storage::F16(w) => (k.axpy8_f16)(a, r.map(|j| &w[j * c..(j + 1) * c]), y),
            Storage::BF16(w) => (k.axpy8_bf16)(a, r.map(|j| &w[j * c..(j + 1) * c]), y),
            _ => {
                for i in 0..8 {
                    self.axpy_row(r[i], 0, a[i], y);
                }
            }
        }
    }

    /// `y += Σ_i a[i] · row[r[i]][c0 .. c0 + y.len()]` for four rows in one pass over `y`.
    #[inline]
    pub fn axpy_rows4(&self, r: [usize; 4], c0: usize, a: &[f32; 4], y: &mut [f32]) {
        let k = kernels();
        let n = y.len();
        let seg = |i: usize| r[i] * self.cols + c0;
        match &self.data {
            Storage::F32(w) => (k.axpy4_f32)(a, [0, 1, 2, 3].map(|i| &w[seg(i)..seg(i) + n]), y),
            Storage::F16(w) => (k.axpy4_f16)(a, [0, 1, 2, 3].map(|i| &w[seg(i)..seg(i) + n]), y),
            Storage::BF16(w) => (k.axpy4_bf16)(a, [0, 1, 2, 3].map(|i| &w[seg(i)..seg(i) + n]), y),
            Storage::Q8_0(w) if quant_kernels().axpy4_q8_0.is_some() => {
                let f = quant_kernels().axpy4_q8_0.expect("checked");
                let (b0, nb) = (c0 / QBLOCK, n / QBLOCK);
                let row = |i: usize| {
                    let s = r[i] * self.cols / QBLOCK + b0;
                    &w[s..s + nb]
                };
                f(a, [row(0), row(1), row(2), row(3)], y)
            }
            Storage::Q4_0(w) if quant_kernels().axpy4_q4_0.is_some() => {
                let f = quant_kernels().axpy4_q4_0.expect("checked");
                let (b0, nb) = (c0 / QBLOCK, n / QBLOCK);
                let row = |i: usize| {
                    let s = r[i] * self.cols / QBLOCK + b0;
                    &w[s..s + nb]
                };
                f(a, [row(0), row(1), row(2), row(3)], y)
            }
            Storage::Q8_0(_)
            | Storage::Q4_0(_)
            | Storage::Q4_0x16(_)
            | Storage::Q8_0x16(_)
            | Storage::Q4_0P(_)
            | Storage::Q8_0P(_) => {
                for i in 0..4 {
                    self.axpy_row(r[i], c0, a[i], y);
                }
            }
        }
    }

    /// `y = Σ_{(j, a) ∈ active} a · row[j]` over whole rows (`y.len() == cols`), in the order
    /// of `active`: the decode down projection over one thread's run of non-zero neurons.
    /// Quantized rows go one at a time (a single forward stream) with the row two ahead
    /// prefetched; float rows eight per pass over `y` (PERF NOTES in kernels/mod.rs).
    /// Returns the number of rows read (the active ones; for the planar layout also the zero
    /// rows of groups read whole).
    pub fn sparse_axpy(&self, active: &[(u32, f32)], y: &mut [f32]) -> usize {
        if self.is_planar() {
            return DOWN_PLAN.with(|cell| {
                let plan = &mut *cell.borrow_mut();
                self.down_plan(active, plan);
                self.down_plan_run(plan, 0..plan.units.len(), y)
            });
        }
        y.fill(0.0);
        if self.dtype().is_quantized() {
            for (k, &(j, a)) in active.iter().enumerate() {
                if let Some(&(jn, _)) = active.get(k + 2) {
                    self.prefetch_row(jn as usize);
                }
                self.axpy_row(j as usize, 0, a, y);
            }
            return active.len();
        }
        // Float rows: eight per pass over `y` (8 rows in flight: 1.2-1.5x faster than 4 from
        // DRAM at 0-90 % zeros, PERF NOTES), no software prefetch (it cost 8-45 %: bf16
        // 0 % / 50 % / 90 % zeros 1.88 / 1.12 ms / 82 µs with it, 1.73 / 0.63 ms / 65 µs
        // without).
        let mut octs = active.chunks_exact(8);
        for o in &mut octs {
            let rows = std::array::from_fn(|i| o[i].0 as usize);
            let a = std::array::from_fn(|i| o[i].1);
            self.axpy_rows8(rows, &a, y);
        }
        let rest = octs.remainder();
        let mut quads = rest.chunks_exact(4);
        for q in &mut quads {
            let rows = [
                q[0].0 as usize,
                q[1].0 as usize,
                q[2].0 as usize,
                q[3].0 as usize,
            ];
            self.axpy_rows4(rows, 0, &[q[0].1, q[1].1, q[2].1, q[3].1], y);
        }
        for &(j, a) in quads.remainder() {
            self.axpy_row(j as usize, 0, a, y);
        }
        active.len()
    }

    /// `y = Σ_i a_i · row[j_i]` for `terms` of consecutive rows (`j_i = j_0 + i`: absorbed
    /// attention's W_UK, a head's rows). Float rows are summed one at a time, front to back: a
    /// single stream through memory. The 8-row passes of [`Self::sparse_axpy`], made for
    /// scattered rows, read 8 interleaved streams of one short row each, and for f16 W_UK
    /// (rows of 512) took 134 µs per layer against 84 µs row by row (PERF NOTES in
    /// kernels/mod.rs). Quantized matrices go through `sparse_axpy` (the planar kernel).
    pub fn axpy_consecutive(&self, terms: &[(u32, f32)], y: &mut [f32]) {
        debug_assert!(terms.windows(2).all(|p| p[1].0 == p[0].0 + 1));
        if self.dtype().is_quantized() {
            self.sparse_axpy(terms, y);
            return;
        }
        y.fill(0.0);
        for &(j, a) in terms {
            self.axpy_row(j as usize, 0, a, y);
        }
    }

    /// The decode down projection of `active` into `out` (`cols` floats): the partials of
    /// [`Matrix::sparse_axpy_par`] added in order, exactly as the model's MLP does. Returns the
    /// rows read.
    pub fn sparse_down(
        &self,
        active: &[(u32, f32)],
        plan: &mut DownPlan,
        parts: &mut Vec<f32>,
        out: &mut [f32],
    ) -> usize {
        let d = self.cols;
        let (nparts, read) = self.sparse_axpy_par(active, plan, parts);
        let (first, rest) = parts[..nparts * d].split_at(d);
        let out = &mut out[..d];
        out.copy_from_slice(first);
        for part in rest.chunks(d) {
            crate::ops::add(out, part);
        }
        read
    }

    /// `Σ_{(j, a) ∈ active} a · row[j]` over the current team (or rayon pool), as partial sums:
    /// `parts` (resized to `n · cols`) holds `n` partials whose sum, added in order, is the
    /// result; returns `(n, rows read)`.
    ///
    /// Planar matrices: the [`DownPlan`]'s units are cut into its fixed spans
    /// ([`DownPlan::spans`]), one partial per span, and the threads claim spans as they go (the
    /// next one claimed before the last unit of the current one, whose kernel call prefetches
    /// the claimed span's first rows). A span's partial is the same whichever thread sums it,
    /// so the result depends on the active list only, not on the thread count or timing; and a
    /// thread slowed by the machine (the other vCPU of this VM at times ran 40-50 µs behind in
    /// a 90 µs projection) leaves the last spans to the other one. PERF NOTES (stop 19) in
    /// quant/mod.rs.
    ///
    /// Other matrices: the active list is split into one contiguous run per thread, each summed
    /// into its own partial (8 KiB at PLM-1.8B's width, it stays in L1). Whole rows read front
    /// to back keep the hardware prefetcher streaming; splitting columns instead (each thread
    /// reading half of every row) measured 1.3-1.8x slower from DRAM (PERF NOTES in
    /// kernels/mod.rs).
    pub fn sparse_axpy_par(
        &self,
        active: &[(u32, f32)],
        plan: &mut DownPlan,
        parts: &mut Vec<f32>,
    ) -> (usize, usize) {
        let d = self.cols;
        let threads = current_threads();
        if self.down_plan(active, plan) {
            let plan = &*plan;
            let spans = plan.spans();
            let n = spans.len().max(1);
            parts.resize(n * d, 0.0);
            if spans.is_empty() {
                parts[..d].fill(0.0);
                return (1, 0);
            }
            let out = SendPtr(parts.as_mut_ptr());
            let (claim, read) = (AtomicUsize::new(0), AtomicUsize::new(0));
            let take = || {
                let s = claim.fetch_add(1, Ordering::Relaxed);
                spans.get(s).map(|r| (s, r.clone()))
            };
            par_tasks(threads.min(n), |_| {
                let mut cur = take();
                let mut first = true;
                while let Some((s, units)) = cur {
                    // SAFETY: span s is claimed once (atomic counter), so the partials written
                    // are disjoint, and parts holds n·d floats for the whole call.
                    let y = unsafe { std::slice::from_raw_parts_mut(out.get().add(s * d), d) };
                    let (r, then) = self.down_plan_follow(plan, units, y, first, &take);
                    read.fetch_add(r, Ordering::Relaxed);
                    (cur, first) = (then, false);
                }
            });
            return (n, read.into_inner());
        }
        let per = active.len().div_ceil(threads).max(1);
        let n = active.len().div_ceil(per).max(1);
        parts.resize(n * d, 0.0);
        let read = AtomicUsize::new(0);
        par_chunks([&mut parts[..n * d]], [d], |pi, [y]| {
            let (a, b) = (
                (pi * per).min(active.len()),
                ((pi + 1) * per).min(active.len()),
            );
            read.fetch_add(self.sparse_axpy(&active[a..b], y), Ordering::Relaxed);
        });
        (n, read.into_inner())
    }

    /// The kernel calls of the planar down projection for `active` into `plan` (see
    /// [`DownPlan`]); `false` (plan untouched) for other layouts. `active` is expected sorted
    /// by row with distinct rows, as `relu2_collect` gives it; any other list is planned in
    /// that form (sorted, a repeated row's coefficients added), at the cost of a copy.
    pub fn down_plan(&self, active: &[(u32, f32)], plan: &mut DownPlan) -> bool {
        if !self.is_planar() {
            return false;
        }
        plan.build(self.rows, active);
        true
    }

    /// `y = Σ` over the units `units` of `plan` (built by [`Self::down_plan`] for this matrix);
    /// returns the rows read. Each unit is summed the same way whichever thread runs it, so
    /// splitting the units across threads changes only the order in which partials are added.
    pub fn down_plan_run(
        &self,
        plan: &DownPlan,
        units: std::ops::Range<usize>,
        y: &mut [f32],
    ) -> usize {
        self.down_plan_follow(plan, units, y, true, &|| None).0
    }

    /// [`Self::down_plan_run`], then what follows: before the last unit, `then()` names the
    /// next span this thread will run (its index and units), whose first unit the last kernel
    /// call prefetches; returned with the rows read. `first`: prefetch the first unit's rows
    /// up front (no earlier call did).
    fn down_plan_follow<F: Fn() -> Option<(usize, std::ops::Range<usize>)>>(
        &self,
        plan: &DownPlan,
        units: std::ops::Range<usize>,
        y: &mut [f32],
        first: bool,
        then: &F,
    ) -> (usize, Option<(usize, std::ops::Range<usize>)>) {
        y.fill(0.0);
        match &self.data {
            Storage::Q4_0P(p) => {
                plan_run(p, quant_kernels().down_q4_0, plan, units, y, first, then)
            }
            Storage::Q8_0P(p) => {
                plan_run(p, quant_kernels().down_q8_0, plan, units, y, first, then)
            }
            _ => panic!("down_plan_run on a matrix without the planar layout"),
        }
    }

    /// Sparse rank update of a 4×64 tile of `Y = A · W` (W = this matrix, `[rows, cols]`):
    /// `y[i·64 + c] += Σ_{j ∈ js} act[i·stride + j] · W[j, c0 + c]` for i < 4, c < 64.
    pub fn rank4x64(&self, act: &[f32], stride: usize, js: &[u32], c0: usize, y: &mut [f32; 256]) {
        let k = kernels();
        let c = self.cols;
        match &self.data {
            Storage::F32(w) => (k.rank4x64_f32)(act, stride, js, &w[c0..], c, y),
            Storage::F16(w) => (k.rank4x64_f16)(act, stride, js, &w[c0..], c, y),
            Storage::BF16(w) => (k.rank4x64_bf16)(act, stride, js, &w[c0..], c, y),
            Storage::Q8_0(_)
            | Storage::Q4_0(_)
            | Storage::Q4_0x16(_)
            | Storage::Q8_0x16(_)
            | Storage::Q4_0P(_)
            | Storage::Q8_0P(_) => {
                for &j in js {
                    for i in 0..4 {
                        let a = act[i * stride + j as usize];
                        if a != 0.0 {
                            self.axpy_row(j as usize, c0, a, &mut y[i * 64..(i + 1) * 64]);
                        }
                    }
                }
            }
        }
    }

    /// [`Matrix::rank4x64`] for several 4-token groups on one 64-column tile:
    /// `out[g·256..(g + 1)·256] += ` group g's update, `act` holding the groups' activations
    /// one after another (`[groups·4, stride]`), `js[g]` group g's rows in ascending order.
    /// Quantized rows are widened to f32 once per tile, in chunks of [`RANK_CHUNK`] rows (64 KiB
    /// of f32, so a chunk stays in L2 while every group reads it), and then run through the f32
    /// kernel: per (row, token), `a · (d · q)` instead of the AXPY's `(a · d) · q` (the same to
    /// rounding), without widening each row again for each group and token.
    pub fn rank4x64_groups(
        &self,
        act: &[f32],
        stride: usize,
        js: &[Vec<u32>],
        c0: usize,
        out: &mut [f32],
    ) {
        assert!(out.len() >= js.len() * 256, "rank4x64_groups output");
        fn tile(g: usize, out: &mut [f32]) -> &mut [f32; 256] {
            (&mut out[g * 256..(g + 1) * 256]).try_into().expect("256")
        }
        if !self.dtype().is_quantized() {
            for (g, rows) in js.iter().enumerate() {
                self.rank4x64(&act[g * 4 * stride..], stride, rows, c0, tile(g, out));
            }
            return;
        }
        let k = kernels();
        let mut used = vec![false; self.rows];
        for rows in js {
            for &j in rows {
                used[j as usize] = true;
            }
        }
        let mut scratch = vec![0f32; RANK_CHUNK * 64];
        let mut rel: Vec<u32> = Vec::new();
        for r0 in (0..self.rows).step_by(RANK_CHUNK) {
            let r1 = (r0 + RANK_CHUNK).min(self.rows);
            let mut any = false;
            for r in r0..r1 {
                if used[r] {
                    let row = &mut scratch[(r - r0) * 64..(r - r0 + 1) * 64];
                    row.fill(0.0);
                    // 0 + (1·d)·q is exactly d·q
                    self.axpy_row(r, c0, 1.0, row);
                    any = true;
                }
            }
            if !any {
                continue;
            }
            for (g, rows) in js.iter().enumerate() {
                let lo = rows.partition_point(|&j| (j as usize) < r0);
                let hi = rows.partition_point(|&j| (j as usize) < r1);
                if lo == hi {
                    continue;
                }
                rel.clear();
                rel.extend(rows[lo..hi].iter().map(|&j| j - r0 as u32));
                // row r0 + j of the group's activations is element j of this slice's rows
                (k.rank4x64_f32)(
                    &act[g * 4 * stride + r0..],
                    stride,
                    &rel,
                    &scratch,
                    64,
                    tile(g, out),
                );
            }
        }
    }

    /// Row `r` widened to f32 into `out` (`out.len() == cols`).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let s = r * self.cols;
        match &self.data {
            Storage::F32(w) => out.copy_from_slice(&w[s..s + self.cols]),
            Storage::F16(w) => {
                for (o, v) in out.iter_mut().zip(&w[s..s + self.cols]) {
                    *o = v.to_f32();
                }
            }
            Storage::BF16(w) => {
                for (o, v) in out.iter_mut().zip(&w[s..s + self.cols]) {
                    *o = v.to_f32();
                }
            }
            // Dequantize with the dispatched SIMD AXPY: 0 + (1·d)·q is exactly d·q.
            Storage::Q8_0(w) => {
                let nb = self.cols / QBLOCK;
                out.fill(0.0);
                (quant_kernels().axpy_q8_0)(1.0, &w[r * nb..(r + 1) * nb], out);
            }
            Storage::Q4_0(w) => {
                let nb = self.cols / QBLOCK;
                out.fill(0.0);
                (quant_kernels().axpy_q4_0)(1.0, &w[r * nb..(r + 1) * nb], out);
            }
            // Interleaved / planar rows: the AXPY above on the row taken out (0 + (1·d)·q = d·q).
            Storage::Q4_0x16(_) | Storage::Q8_0x16(_) | Storage::Q4_0P(_) | Storage::Q8_0P(_) => {
                out.fill(0.0);
                self.axpy_row(r, 0, 1.0, out);
            }
        }
    }

    /// `y = W x` (`x: [cols]`, `y: [rows]`): one contiguous range of rows per thread (on the
    /// decode team if one is entered, else the current rayon pool), see [`par_ranges`].
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) {
        debug_assert_eq!(x.len(), self.cols);
        debug_assert_eq!(y.len(), self.rows);
        // Whole 16-row groups of the interleaved layouts; claims of at least 64 KiB of weights.
        let unit = match self.data {
            Storage::Q4_0x16(_) | Storage::Q8_0x16(_) => 16,
            _ => 1,
        };
        let grain = (64 << 10) / (unit * (self.nbytes() / self.rows.max(1)).max(1));
        if self.dtype().is_quantized() {
            // Quantize the input once; every row range reuses the same blocks. The buffers are
            // taken out of the thread-local for the parallel region, not borrowed across it:
            // a rayon worker waiting inside it can run another session's GEMV on this thread
            // (concurrent sessions on one model), which then starts from empty buffers instead
            // of finding the cell borrowed.
            let (mut xq, mut xs) = GEMV_IN.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
            quantize_input(x, &mut xq);
            self.input_sums(&xq, &mut xs);
            par_ranges(y, unit, grain, |r0, ys| self.dot_rows_q(r0, &xq, &xs, ys));
            GEMV_IN.with(|cell| *cell.borrow_mut() = (xq, xs));
        } else {
            par_ranges(y, unit, grain, |r0, ys| self.dot_rows(r0, x, ys));
        }
    }

    /// `Y = X Wᵀ` for `t` input rows: `x: [t, cols]`, `y: [t, rows]` (prefill GEMM).
    /// Weight rows are widened four at a time into f32 scratch and multiplied against tiles
    /// of four inputs by the `tile4x4` kernel, so each weight byte is read once per call.
    pub fn matmul(&self, x: &[f32], t: usize, y: &mut [f32]) {
        debug_assert_eq!(x.len(), t * self.cols);
        debug_assert_eq!(y.len(), t * self.rows);
        if t == 1 {
            return self.matvec(x, y);
        }
        let k = kernels();
        let cols = self.cols;
        let chunk = row_chunk(self.rows).div_ceil(4) * 4;
        // yt: [rows, t], filled in parallel over row chunks, then transposed into y.
        let mut yt = vec![0f32; self.rows * t];
        yt.par_chunks_mut(chunk * t)
            .enumerate()
            .for_each(|(ci, ys)| {
                let r0 = ci * chunk;
                let nr = ys.len() / t;
                let mut scratch = vec![0f32; 4 * cols];
                let mut tile = [0f32; 16];
                let mut i = 0;
                while i < nr {
                    let g = (nr - i).min(4);
                    let w: &[f32] = match &self.data {
                        Storage::F32(w) if g == 4 => &w[(r0 + i) * cols..(r0 + i + 4) * cols],
                        _ => {
                            for q in 0..g {
                                self.row_to_f32(r0 + i + q, &mut scratch[q * cols..(q + 1) * cols]);
                            }
                            &scratch[..g * cols]
                        }
                    };
                    let mut j = 0;
                    if g == 4 {
                        while j + 4 <= t {
                            (k.tile4x4_f32)(w, cols, &x[j * cols..], cols, cols, &mut tile);
                            for q in 0..4 {
                                ys[(i + q) * t + j..(i + q) * t + j + 4]
                                    .copy_from_slice(&tile[4 * q..4 * q + 4]);
                            }
                            j += 4;
                        }
                    }
                    for q in 0..g {
                        for jj in j..t {
                            ys[(i + q) * t + jj] = (k.dot_f32)(
                                &w[q * cols..(q + 1) * cols],
                                &x[jj * cols..(jj + 1) * cols],
                            );
                        }
                    }
                    i += g;
                }
            });
        for r in 0..self.rows {
            for j in 0..t {
                y[j * self.rows + r] = yt[r * t + j];
            }
        }
    }
}

/// Rows per chunk of [`Matrix::rank4x64_groups`]' widened quantized rows (256 × 64 f32 = 64 KiB).
pub const RANK_CHUNK: usize = 256;

/// Columns per block of the dense float `W_down` ([`Matrix::split_cols`]): 2048 f32 inputs
/// (8 KiB) stay in L1 while a block's rows stream by. The uncut GEMV of PLM-1.8B's `W_down`
/// (rows of 8192 values, 32 KiB of input) read 66 % of a plain read in f16, against 99 % for
/// rows of 2048 (PERF NOTES in kernels/mod.rs).
pub const DOWN_COL_BLOCK: usize = 2048;

/// `y = W x` for `W` given as column blocks (`blocks[b]` holds the columns after those of
/// `blocks[..b]`, all with the same rows, as [`Matrix::split_cols`] makes them; `x` is the
/// whole input), in one parallel
/// region: each thread's claim of rows goes through the blocks in order, so its reads are one
/// stream per block, and `y[r] = (W_0 x_0)[r] + (W_1 x_1)[r] + …` in that order whatever the
/// split. One block is [`Matrix::matvec`].
pub fn matvec_blocks(blocks: &[Matrix], x: &[f32], y: &mut [f32]) {
    let Some((first, rest)) = blocks.split_first() else {
        return y.fill(0.0);
    };
    if rest.is_empty() {
        return first.matvec(x, y);
    }
    debug_assert_eq!(blocks.iter().map(|b| b.cols).sum::<usize>(), x.len());
    debug_assert!(blocks
        .iter()
        .all(|b| b.rows == y.len() && !b.dtype().is_quantized()));
    let per_row = blocks.iter().map(|b| b.nbytes()).sum::<usize>() / y.len().max(1);
    let grain = (64 << 10) / per_row.max(1);
    par_ranges(y, 1, grain, |r0, ys| {
        BLOCK_OUT.with(|cell| {
            let tmp = &mut *cell.borrow_mut();
            tmp.resize(ys.len(), 0.0);
            let mut c0 = 0;
            for (b, m) in blocks.iter().enumerate() {
                let xb = &x[c0..c0 + m.cols];
                if b == 0 {
                    m.dot_rows(r0, xb, ys);
                } else {
                    m.dot_rows(r0, xb, tmp);
                    for (o, v) in ys.iter_mut().zip(tmp.iter()) {
                        *o += v;
                    }
                }
                c0 += m.cols;
            }
        })
    });
}

/// `Y = X Wᵀ` for `t` input rows (`x: [t, cols]`, `y: [t, rows]`) with `W` given as column
/// blocks: `mm(W_b, X_b, t, Y_b)` per block (X_b: columns of block `b` of every input row),
/// summed in block order as [`matvec_blocks`] sums them.
pub fn matmul_blocks(
    blocks: &[Matrix],
    x: &[f32],
    t: usize,
    y: &mut [f32],
    mm: impl Fn(&Matrix, &[f32], usize, &mut [f32]),
) {
    let cols: usize = blocks.iter().map(|b| b.cols).sum();
    debug_assert_eq!(x.len(), t * cols);
    if blocks.len() == 1 {
        return mm(&blocks[0], x, t, y);
    }
    y.fill(0.0);
    let (mut xb, mut yb) = (Vec::new(), vec![0f32; y.len()]);
    let mut c0 = 0;
    for m in blocks {
        xb.clear();
        for i in 0..t {
            xb.extend_from_slice(&x[i * cols + c0..i * cols + c0 + m.cols]);
        }
        mm(m, &xb, t, &mut yb);
        for (o, v) in y.iter_mut().zip(&yb) {
            *o += v;
        }
        c0 += m.cols;
    }
}

/// Interleave `[rows, nb]` blocks 16 rows at a time into `[rows/16, nb]` packed blocks in the
/// same allocation (a 16-row group occupies the same bytes before and after), so repacking a
/// large matrix at load time needs one group of scratch, not a second copy (peak RSS).
fn repack_in_place<P, Q>(v: Vec<P>, nb: usize, pack: fn([&P; 16]) -> Q) -> Vec<Q>
where
    P: Copy + Send + Sync,
    Q: Copy + Send,
{
    assert!(
        std::mem::size_of::<Q>() == 16 * std::mem::size_of::<P>()
            && std::mem::align_of::<Q>() == std::mem::align_of::<P>(),
        "packed block must be 16 plain blocks"
    );
    assert!(
        nb > 0 && v.len().is_multiple_of(16 * nb),
        "whole 16-row groups"
    );
    let mut b = v.into_boxed_slice();
    b.par_chunks_mut(16 * nb).for_each(|group| {
        let plain: Vec<P> = group.to_vec();
        // SAFETY: the chunk holds 16·nb P = nb Q bytes (size asserted), with Q's alignment
        // (equal to P's); every Q is written before the chunk is read as Q again.
        let packed: &mut [Q] =
            unsafe { std::slice::from_raw_parts_mut(group.as_mut_ptr() as *mut Q, nb) };
        for (bi, o) in packed.iter_mut().enumerate() {
            *o = pack(std::array::from_fn(|i| &plain[i * nb + bi]));
        }
    });
    let n = b.len() / 16;
    let ptr = Box::into_raw(b) as *mut P as *mut Q;
    // SAFETY: the allocation came from a Box<[P]> of 16·n elements: same size as n Q and the
    // same alignment (asserted), so it is a valid Vec<Q> of length and capacity n.
    unsafe { Vec::from_raw_parts(ptr, n, n) }
}

/// Run `f` on blocks `b0..b0 + nb` of row `r` of an interleaved matrix (`nbr` blocks per row),
/// taken out into GGUF layout in the thread-local buffer `buf`.
fn with_row16<B: Interleaved16, R>(
    w: &[B],
    nbr: usize,
    r: usize,
    b0: usize,
    nb: usize,
    buf: &'static std::thread::LocalKey<std::cell::RefCell<Vec<B::Row>>>,
    f: impl FnOnce(&[B::Row]) -> R,
) -> R {
    let g = &w[r / 16 * nbr..(r / 16 + 1) * nbr];
    buf.with(|cell| {
        let mut v = cell.borrow_mut();
        v.clear();
        v.extend(g[b0..b0 + nb].iter().map(|blk| blk.row(r % 16)));
        f(&v)
    })
}

/// Rows per group of the planar layout, and at most per call of its down kernel.
pub const DOWN_GROUP: usize = quant::PLANAR_GROUP;
/// In [`quant::DownLayout::Groups`] (in `Rows` every group's active rows are pooled), a
/// planar group with at least this many active rows is read whole, front to back (zero
/// rows included: they add nothing, and the hardware prefetcher streams the group); the
/// active rows of sparser groups are pooled 32 per kernel call and prefetched into L2 one call
/// ahead. Measured on W_downᵀ 8192×2048 from DRAM, 2 threads (`examples/down_probe`): reading
/// every group whole is best at 0 % zeros and worst at 90 %; prefetching dense groups cost up
/// to 40 %; 12 was best at 50 % zeros. One call per sparse group (instead of pooling) made
/// 90-99 % zeros 1.5-2.5× slower: per call, the coefficient pass and the y updates of all
/// blocks cost as much as a few rows.
pub const DOWN_DENSE_AT: usize = 12;

/// The kernel calls ("units") of one planar down projection. The sorted active list is cut
/// into the groups of [`DOWN_GROUP`] consecutive rows: in [`quant::DownLayout::Groups`], a
/// group with at least [`DOWN_DENSE_AT`] active rows is one unit with all its rows (zero rows
/// included: they add nothing, and the group is read front to back); the active rows of
/// sparser groups (in `Rows`, of all groups) are pooled, in order, 32 per unit (rows of a
/// partial last group in their own units). The units
/// depend only on the active list, so a projection gives the same bits for any split of its
/// units across threads up to the order of adding the partial sums.
#[derive(Debug, Default)]
pub struct DownPlan {
    /// The units' entries `(row, coefficient)`, unit after unit.
    pub entries: Vec<(u32, f32)>,
    /// Per unit: `(first entry, entries, whole group?)`.
    pub units: Vec<(u32, u32, bool)>,
    /// The spans of the units (see [`DownPlan::spans`]), cut when the plan is built (kept
    /// here so that decoding reuses the buffer instead of allocating per projection).
    spans: Vec<std::ops::Range<usize>>,
}

impl DownPlan {
    pub const fn new() -> DownPlan {
        DownPlan {
            entries: Vec::new(),
            units: Vec::new(),
            spans: Vec::new(),
        }
    }

    fn build(&mut self, nrows: usize, active: &[(u32, f32)]) {
        self.build_units(nrows, active);
        self.cut_spans();
    }

    fn build_units(&mut self, nrows: usize, active: &[(u32, f32)]) {
        if !active.windows(2).all(|w| w[0].0 < w[1].0) {
            // not the sorted list of distinct rows the decode loop gives (public callers may
            // pass any order): plan its canonical form, rows sorted and a repeated row's
            // coefficients added, so every layout and split sums the same terms
            let mut sorted = active.to_vec();
            sorted.sort_by_key(|e| e.0);
            let mut merged: Vec<(u32, f32)> = Vec::with_capacity(sorted.len());
            for (j, a) in sorted {
                match merged.last_mut() {
                    Some(last) if last.0 == j => last.1 += a,
                    _ => merged.push((j, a)),
                }
            }
            return self.build_units(nrows, &merged);
        }
        self.entries.clear();
        self.units.clear();
        let group = |j: u32| j as usize / DOWN_GROUP;
        let full = nrows / DOWN_GROUP; // groups below this index have 32 rows
        if quant::down_layout() == quant::DownLayout::Rows {
            // a group is never read whole, every row is pooled: the sorted list cut into runs
            // of 32, the rows of full groups first, then those of the partial group (what the
            // loop below gives with no group read whole, without its per-group scan: 3.5 → 0.2
            // µs at PLM-1.8B's 819 active rows)
            let split = active.partition_point(|e| (e.0 as usize) < full * DOWN_GROUP);
            self.entries.extend_from_slice(active);
            for (lo, hi) in [(0, split), (split, active.len())] {
                for s in (lo..hi).step_by(DOWN_GROUP) {
                    let n = DOWN_GROUP.min(hi - s);
                    self.units.push((s as u32, n as u32, false));
                }
            }
            return;
        }
        // the open pool of sparse rows (all from full groups, or all from the partial one)
        let (mut pool, mut np, mut pool_partial) = ([(0u32, 0f32); DOWN_GROUP], 0, false);
        let mut s = 0;
        while s < active.len() {
            let g = group(active[s].0);
            // the group's entries (a linear scan: a few per group when sparse, where a binary
            // search's mispredicted branches cost more than the whole scan)
            let mut e = s + 1;
            while e < active.len() && group(active[e].0) == g {
                e += 1;
            }
            if e - s >= DOWN_DENSE_AT {
                let r0 = g * DOWN_GROUP;
                let mut rows = [(0u32, 0f32); DOWN_GROUP];
                let gr = quant::planar_group_rows(nrows, r0);
                for (i, r) in rows[..gr].iter_mut().enumerate() {
                    r.0 = (r0 + i) as u32;
                }
                for &(j, v) in &active[s..e] {
                    rows[j as usize - r0].1 = v;
                }
                self.push_unit(&rows[..gr], true);
            } else {
                if (g >= full) != pool_partial {
                    self.push_unit(&pool[..np], false);
                    (np, pool_partial) = (0, g >= full);
                }
                for &entry in &active[s..e] {
                    pool[np] = entry;
                    np += 1;
                    if np == DOWN_GROUP {
                        self.push_unit(&pool, false);
                        np = 0;
                    }
                }
            }
            s = e;
        }
        self.push_unit(&pool[..np], false);
    }

    fn push_unit(&mut self, entries: &[(u32, f32)], whole: bool) {
        if !entries.is_empty() {
            let start = self.entries.len() as u32;
            self.entries.extend_from_slice(entries);
            self.units.push((start, entries.len() as u32, whole));
        }
    }

    /// The plan's spans: consecutive runs of units, fixed by the number of units only, that
    /// the threads claim one at a time, each summed into its own partial (see
    /// [`Matrix::sparse_axpy_par`]). Counted from the end they hold 1, 1, 2, 4, 8, … units and
    /// the first span the rest (26 units: 10, 8, 4, 2, 1, 1), so that two threads finish
    /// within about one unit of each other whichever is slowed; none for an empty plan.
    pub fn spans(&self) -> &[std::ops::Range<usize>] {
        &self.spans
    }

    /// Cut [`DownPlan::spans`] from the units: sizes 1, 1, 2, 4, … taken from the end, the
    /// rest first; no allocation once the buffer has grown to the plan's span count.
    fn cut_spans(&mut self) {
        self.spans.clear();
        let (mut end, mut next) = (self.units.len(), 1);
        while end > 0 {
            let taken = self.spans.len();
            let take = if taken < 2 { 1 } else { next };
            if take >= end {
                self.spans.push(0..end);
                break;
            }
            self.spans.push(end - take..end);
            end -= take;
            if taken + 1 >= 2 {
                next = take * 2;
            }
        }
        self.spans.reverse();
    }

    /// Rows read by units `units`.
    pub fn rows(&self, units: std::ops::Range<usize>) -> usize {
        self.units[units].iter().map(|u| u.1 as usize).sum()
    }
}

/// Run units `units` of `plan` through `kernel` into `y` (accumulating); returns the rows
/// read and the span `then()` named before the last unit (see
/// [`Matrix::down_plan_follow`]), whose first unit that last call prefetched. The next
/// pooled unit's rows are prefetched while one unit is computed, by the kernel chunk by chunk
/// as it computes (its `next` rows), not all at once before the call: 90 % zeros from DRAM on
/// 2 threads (criterion `sparse_down_dram`), Q8_0 (34 lines per row) 78-103 → 48-54 µs (the
/// burst of ~1100 prefetches per unit stalled on full miss buffers); Q4_0 (18 lines) 49-61 →
/// 33-36 µs in two alternated pairs, and 73-80 → 57-60 µs in `examples/bw_probe` (an earlier
/// build had measured the burst faster for Q4_0, PERF NOTES). In the rows layout the kernel
/// spreads them finer still, a few lines per step of its inner loop (PERF NOTES, stop 18).
fn plan_run<Q: quant::Pod, F: Fn() -> Option<(usize, std::ops::Range<usize>)>>(
    p: &Planar<Q>,
    kernel: Option<quant::DownKernel<Q>>,
    plan: &DownPlan,
    units: std::ops::Range<usize>,
    y: &mut [f32],
    first: bool,
    then: &F,
) -> (usize, Option<(usize, std::ops::Range<usize>)>) {
    let kernel = kernel.expect("the planar layout exists only with its kernel");
    let us = &plan.units[units];
    let entries = |u: &(u32, u32, bool)| &plan.entries[u.0 as usize..(u.0 + u.1) as usize];
    // the first unit's rows up front (unless an earlier call prefetched them)
    if let Some(u) = us.first().filter(|u| first && !u.2) {
        for &(j, _) in entries(u) {
            p.prefetch_row(j as usize);
        }
    }
    let (mut rows, mut a) = ([0u32; DOWN_GROUP], [0f32; DOWN_GROUP]);
    let mut next = [0u32; DOWN_GROUP];
    let mut read = 0;
    let mut follow = None;
    for (k, u) in us.iter().enumerate() {
        // the next pooled unit (after the last one, the first of the span that follows):
        // handed to the kernel as `next`, which prefetches it
        let v = if k + 1 < us.len() {
            us.get(k + 1)
        } else {
            follow = then();
            follow.as_ref().and_then(|(_, r)| plan.units.get(r.start))
        };
        let mut nn = 0;
        if let Some(v) = v.filter(|v| !v.2) {
            for (x, &(j, _)) in next.iter_mut().zip(entries(v)) {
                *x = j;
            }
            nn = v.1 as usize;
        }
        let es = entries(u);
        let n = es.len();
        for (i, &(j, v)) in es.iter().enumerate() {
            (rows[i], a[i]) = (j, v);
        }
        let n4 = n.div_ceil(4) * 4;
        for i in n..n4 {
            (rows[i], a[i]) = (rows[0], 0.0);
        }
        kernel(p, &rows[..n4], &a[..n4], &next[..nn], y);
        read += n;
    }
    if us.is_empty() {
        follow = then();
    }
    (read, follow)
}

/// Run `f` on blocks `b0..b0 + nb` of row `r` of a planar matrix (`nbr` blocks per row),
/// joined back into GGUF blocks in the thread-local buffer `buf`.
fn with_planar_row<B: PlanarBlock, R>(
    p: &Planar<B::Codes>,
    nbr: usize,
    r: usize,
    b0: usize,
    nb: usize,
    buf: &'static std::thread::LocalKey<std::cell::RefCell<Vec<B>>>,
    f: impl FnOnce(&[B]) -> R,
) -> R {
    buf.with(|cell| {
        let mut v = cell.borrow_mut();
        v.clear();
        debug_assert_eq!(nbr, p.nb);
        v.extend((b0..b0 + nb).map(|b| p.block::<B>(r, b)));
        f(&v)
    })
}

/// `out[i] = row[r0 + i] · xq` over an interleaved matrix: whole aligned groups of 16 rows
/// through the 16-row `kernel`, the others one by one through `row_dot`.
#[allow(clippy::too_many_arguments)]
fn gemv16_rows<B>(
    w: &[B],
    nb: usize,
    r0: usize,
    xq: &[BlockQ8_0],
    xs: &[i32],
    out: &mut [f32],
    kernel: fn(&[B], &[BlockQ8_0], &[i32], &mut [f32; 16]),
    row_dot: impl Fn(usize) -> f32,
) {
    let mut i = 0;
    let mut tile = [0f32; 16];
    while i < out.len() {
        let r = r0 + i;
        if r.is_multiple_of(16) && i + 16 <= out.len() {
            kernel(&w[r / 16 * nb..(r / 16 + 1) * nb], xq, xs, &mut tile);
            out[i..i + 16].copy_from_slice(&tile);
            i += 16;
        } else {
            out[i] = row_dot(r);
            i += 1;
        }
    }
}

/// Quantize a GEMV input to Q8_0 blocks into `xq` (resized; `x.len()` a multiple of 32).
fn quantize_input(x: &[f32], xq: &mut Vec<BlockQ8_0>) {
    xq.resize(x.len() / QBLOCK, BlockQ8_0::default());
    quant::quantize_row_q8_0(x, xq).expect("quantized matrices have cols % 32 == 0");
}

/// Rows per parallel task: enough tasks to balance, few enough to keep overhead low.
fn row_chunk(rows: usize) -> usize {
    let tasks = rayon::current_num_threads().max(1) * 8;
    rows.div_ceil(tasks).clamp(16, 4096).min(rows.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` weights in −1..1, a fixed hash of the index modulo `m` (scaled by `2/m`).
    fn seeded_weights(n: usize, m: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 2654435761usize) % m) as f32 / (m as f32 / 2.0) - 1.0)
            .collect()
    }

    /// `(max |got − want|, max |want|)`.
    fn max_err(got: &[f32], want: &[f32]) -> (f32, f32) {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        (err, scale)
    }

    /// `rank4x64_groups` (quantized rows widened once per chunk, then the f32 kernel) against
    /// the rows widened one by one and summed in f64: several groups, row sets crossing chunk
    /// ends, an empty set, and a partial last chunk; the output is added to, not overwritten.
    #[test]
    fn rank4x64_groups_matches_widened_rows() {
        let (rows, cols) = (2 * RANK_CHUNK + 88, 192usize);
        let w = seeded_weights(rows * cols, 4093);
        let stride = rows;
        let groups = 3;
        let act: Vec<f32> = seeded_weights(groups * 4 * stride, 811)
            .iter()
            .enumerate()
            .map(|(i, &v)| if i % 3 == 0 { 0.0 } else { v })
            .collect();
        let js: Vec<Vec<u32>> = vec![
            (0..rows as u32).filter(|j| j % 5 != 1).collect(),
            vec![],
            // rows of the first and last chunks only, across the first chunk's end
            (RANK_CHUNK as u32 - 3..RANK_CHUNK as u32 + 2)
                .chain(2 * RANK_CHUNK as u32 + 7..rows as u32)
                .collect(),
        ];
        for dt in [DType::F32, DType::Q8_0, DType::Q4_0] {
            let m = Matrix::from_f32(rows, cols, &w, dt);
            for c0 in [0usize, 64, 128] {
                let mut got = vec![0.5f32; groups * 256];
                m.rank4x64_groups(&act, stride, &js, c0, &mut got);
                let mut want = vec![0.5f64; groups * 256];
                let mut row = vec![0f32; cols];
                for (g, set) in js.iter().enumerate() {
                    for &j in set {
                        m.row_to_f32(j as usize, &mut row);
                        for i in 0..4 {
                            let a = act[(g * 4 + i) * stride + j as usize] as f64;
                            for c in 0..64 {
                                want[g * 256 + i * 64 + c] += a * row[c0 + c] as f64;
                            }
                        }
                    }
                }
                let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
                let (err, scale) = max_err(&got, &want);
                assert!(
                    err <= 1e-5 * scale.max(1.0),
                    "{dt:?} c0={c0}: {err} of {scale}"
                );
                assert!(
                    got[256..512].iter().all(|&v| v == 0.5),
                    "{dt:?}: empty set untouched"
                );
            }
        }
    }

    /// The planar down layout (where this CPU has its kernel): same rows as the GGUF layout,
    /// and `sparse_axpy` equal to the f32 AXPY of the rows within the int8 coefficient
    /// rounding at every sparsity (dense groups, pooled sparse rows, a partial last group).
    #[test]
    fn planar_down_layout_matches_rows() {
        // 200 rows: six groups of 32 and one of 8; 20 blocks per row: Q4_0 chunks 8, 8, 4,
        // Q8_0 chunks of 4; scale tiles 16 and 4
        let (rows, cols) = (200usize, 640usize);
        let w = seeded_weights(rows * cols, 1999);
        for dt in [DType::Q8_0, DType::Q4_0] {
            let plain = Matrix::from_f32(rows, cols, &w, dt);
            let planar = plain.clone().into_down_layout();
            if !planar.is_planar() {
                assert!(
                    quant_kernels().down_q4_0.is_none(),
                    "kernel present but layout unused"
                );
                continue;
            }
            assert_eq!(planar.dtype(), dt);
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            for r in [0, 31, 32, 63, 64, 191, 192, 199] {
                plain.row_to_f32(r, &mut a);
                planar.row_to_f32(r, &mut b);
                assert_eq!(a, b, "{dt:?} row {r}");
            }
            for zeros in [0usize, 50, 80, 95, 100] {
                let active: Vec<(u32, f32)> = (0..rows)
                    .filter(|j| (j * 7919 + 13) % 100 >= zeros)
                    .map(|j| (j as u32, (j % 9) as f32 * 0.37 + 0.1))
                    .collect();
                let (mut yp, mut yr) = (vec![0f32; cols], vec![0f32; cols]);
                planar.sparse_axpy(&active, &mut yp);
                plain.sparse_axpy(&active, &mut yr);
                let (err, scale) = max_err(&yp, &yr);
                assert!(
                    err <= 2e-2 * scale,
                    "{dt:?} {zeros}% zeros: {err} (scale {scale})"
                );
                if active.is_empty() {
                    assert!(yp.iter().all(|&v| v == 0.0));
                }
            }
        }
    }

    /// `sparse_axpy` is public: an active list out of order, or with a row twice, gives on the
    /// planar layout the bits of its canonical form (sorted, the repeated row's coefficients
    /// added), and agrees with the GGUF layout's AXPY (which sums the list as given).
    #[test]
    fn planar_sparse_down_accepts_any_active_order() {
        let (rows, cols) = (200usize, 640usize);
        let w = seeded_weights(rows * cols, 1999);
        for dt in [DType::Q8_0, DType::Q4_0] {
            let plain = Matrix::from_f32(rows, cols, &w, dt);
            let planar = plain.clone().into_down_layout();
            if !planar.is_planar() {
                continue;
            }
            // rows of a dense group (32..64), sparse ones and the partial group, reversed,
            // with row 40 and row 197 (partial group) listed twice
            let mut canon: Vec<(u32, f32)> = (0..rows as u32)
                .filter(|&j| (32..64).contains(&j) || j % 7 == 0 || j >= 195)
                .map(|j| (j, 0.3 + (j % 5) as f32 * 0.25))
                .collect();
            let mut messy: Vec<(u32, f32)> = canon.iter().rev().copied().collect();
            messy.insert(3, (40, 0.5));
            messy.push((197, -0.75));
            for e in canon.iter_mut() {
                e.1 += match e.0 {
                    40 => 0.5,
                    197 => -0.75,
                    _ => 0.0,
                };
            }
            let (mut yc, mut ym, mut yr) = (vec![0f32; cols], vec![0f32; cols], vec![0f32; cols]);
            planar.sparse_axpy(&canon, &mut yc);
            planar.sparse_axpy(&messy, &mut ym);
            plain.sparse_axpy(&messy, &mut yr);
            assert_eq!(
                yc.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                ym.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{dt:?}"
            );
            let (err, scale) = max_err(&ym, &yr);
            assert!(err <= 2e-2 * scale, "{dt:?}: {err} (scale {scale})");
        }
    }

    /// A DownPlan covers every active entry once (plus the zero rows of groups taken whole),
    /// keeps units within 32 rows and within one group size, and summing its units split
    /// across "threads" equals summing them in one pass up to the order of adding partials.
    #[test]
    fn down_plan_units_and_thread_splits() {
        let (rows, cols) = (200usize, 128usize); // groups: six of 32, one of 8
        let w = seeded_weights(rows * cols, 997);
        let m = Matrix::from_f32(rows, cols, &w, DType::Q4_0).into_down_layout();
        let mut plan = DownPlan::new();
        // group 1 dense (rows 32..64 all active), others sparse, the partial group too
        let active: Vec<(u32, f32)> = (0..rows as u32)
            .filter(|&j| (32..64).contains(&j) || j % 5 == 0)
            .map(|j| (j, 0.25 + (j % 7) as f32))
            .collect();
        if !m.down_plan(&active, &mut plan) {
            assert!(quant_kernels().down_q4_0.is_none());
            return;
        }
        let mut seen = std::collections::HashMap::new();
        for &(s, n, whole) in &plan.units {
            let es = &plan.entries[s as usize..(s + n) as usize];
            assert!(n as usize <= DOWN_GROUP && n > 0);
            let partial = |j: u32| j as usize >= rows / DOWN_GROUP * DOWN_GROUP;
            assert!(
                es.iter().all(|&(j, _)| partial(j) == partial(es[0].0)),
                "mixed group sizes"
            );
            if whole {
                let g = es[0].0 as usize / DOWN_GROUP;
                assert!(es
                    .iter()
                    .enumerate()
                    .all(|(i, &(j, _))| j as usize == g * DOWN_GROUP + i));
            }
            for &(j, v) in es {
                if v != 0.0 {
                    assert!(seen.insert(j, v).is_none(), "row {j} twice");
                }
            }
        }
        assert_eq!(seen.len(), active.len());
        assert!(active.iter().all(|&(j, v)| seen[&j] == v));
        match quant::down_layout() {
            // busy groups whole, the rest pooled
            quant::DownLayout::Groups => {
                assert!(plan.units.iter().any(|u| u.2) && plan.units.iter().any(|u| !u.2))
            }
            // every group's active rows pooled, 32 per unit but for the last unit of the full
            // groups and that of the partial one
            quant::DownLayout::Rows => {
                assert!(plan.units.iter().all(|u| !u.2));
                assert!(plan.units.iter().filter(|u| u.1 < 32).count() <= 2);
            }
        }
        let nu = plan.units.len();
        let mut whole = vec![0f32; cols];
        assert_eq!(m.down_plan_run(&plan, 0..nu, &mut whole), plan.rows(0..nu));
        for cut in 1..nu {
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            m.down_plan_run(&plan, 0..cut, &mut a);
            m.down_plan_run(&plan, cut..nu, &mut b);
            let scale = whole.iter().fold(0f32, |x, v| x.max(v.abs()));
            for c in 0..cols {
                assert!(
                    (a[c] + b[c] - whole[c]).abs() <= 1e-5 * scale,
                    "cut {cut} col {c}"
                );
            }
        }
        // spans: consecutive, covering every unit, 1, 1, 2, 4, … units from the end
        let spans = plan.spans();
        assert_eq!(spans.first().map(|r| r.start), Some(0));
        assert_eq!(spans.last().map(|r| r.end), Some(nu));
        assert!(spans.windows(2).all(|w| w[0].end == w[1].start));
        let sizes: Vec<usize> = spans.iter().rev().map(|r| r.len()).collect();
        for (i, &n) in sizes.iter().enumerate().take(sizes.len() - 1) {
            assert_eq!(n, if i < 2 { 1 } else { 1 << (i - 1) }, "{sizes:?}");
        }
        assert!(sizes[sizes.len() - 1] >= 1);
        let mut many = DownPlan {
            entries: Vec::new(),
            units: vec![(0, 1, false); 26],
            spans: Vec::new(),
        };
        many.cut_spans();
        let lens: Vec<usize> = many.spans().iter().map(|r| r.len()).collect();
        assert_eq!(lens, [10, 8, 4, 2, 1, 1]);
        assert!(DownPlan::new().spans().is_empty());
    }

    /// The planar sparse down projection gives the same bits on 1, 2 and 3 threads (spans, not
    /// threads, fix its partials), and the partials add up to the one-pass sum.
    #[test]
    fn planar_sparse_down_is_independent_of_threads() {
        let (rows, cols) = (1000usize, 256usize);
        let w = seeded_weights(rows * cols, 997);
        for dt in [DType::Q4_0, DType::Q8_0] {
            let m = Matrix::from_f32(rows, cols, &w, dt).into_down_layout();
            if !m.is_planar() {
                return; // no planar kernel on this CPU
            }
            for keep in [1u32, 3, 10, 50] {
                let active: Vec<(u32, f32)> = (0..rows as u32)
                    .filter(|j| j.wrapping_mul(2654435761) % 100 < keep)
                    .map(|j| (j, 0.5 + (j % 5) as f32))
                    .collect();
                let mut sums = Vec::new();
                // one plan and one buffer of partials for all runs, poisoned before each, as
                // decode reuses them: every partial in use must be written in full
                let (mut plan, mut parts) = (DownPlan::new(), Vec::new());
                for threads in [1usize, 2, 3] {
                    let team = crate::team::Team::new(threads).unwrap();
                    parts.clear();
                    parts.resize(64 * cols, f32::NAN);
                    let (n, read) = crate::team::with_team(&team, || {
                        m.sparse_axpy_par(&active, &mut plan, &mut parts)
                    });
                    // (groups read whole count their zero rows)
                    assert_eq!(read, plan.rows(0..plan.units.len()));
                    assert!(read >= active.len());
                    assert_eq!(n, plan.spans().len().max(1));
                    let mut y = parts[..cols].to_vec();
                    for p in parts[cols..n * cols].chunks(cols) {
                        y.iter_mut().zip(p).for_each(|(a, b)| *a += b);
                    }
                    let mut whole = vec![0f32; cols];
                    m.down_plan_run(&plan, 0..plan.units.len(), &mut whole);
                    let scale = whole.iter().fold(1e-6f32, |x, v| x.max(v.abs()));
                    assert!(y
                        .iter()
                        .zip(&whole)
                        .all(|(a, b)| (a - b).abs() <= 1e-5 * scale));
                    assert!(n <= 64, "more partials than the poisoned buffer");
                    sums.push(y);
                }
                for y in &sums[1..] {
                    assert!(
                        y.iter()
                            .zip(&sums[0])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dt:?} keep {keep}: thread counts differ"
                    );
                }
            }
        }
    }

    #[test]
    fn quantized_rows_widen_exactly() {
        let w: Vec<f32> = (0..3 * 64)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        for dt in [DType::Q8_0, DType::Q4_0] {
            let m = Matrix::from_f32(3, 64, &w, dt);
            let mut got = vec![0f32; 64];
            let mut want = vec![0f32; 64];
            for r in 0..3 {
                m.row_to_f32(r, &mut got);
                match &m.data {
                    Storage::Q8_0(b) => {
                        quant::dequantize_row_q8_0(&b[r * 2..r * 2 + 2], &mut want).unwrap()
                    }
                    Storage::Q4_0(b) => {
                        quant::dequantize_row_q4_0(&b[r * 2..r * 2 + 2], &mut want).unwrap()
                    }
                    _ => unreachable!(),
                }
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0)),
                    "{dt:?}"
                );
            }
        }
    }

    #[test]
    fn column_blocks_give_the_whole_matrix_results() {
        // split_cols keeps every value; matvec_blocks / matmul_blocks equal the uncut GEMV /
        // GEMM to rounding, on a team and off it, with a narrower last block and with one block.
        let team = crate::team::Team::new(2).unwrap();
        for (rows, cols, block) in [(37usize, 100usize, 32usize), (64, 5000, 2048), (8, 64, 64)] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                .collect();
            let t = 5;
            let x: Vec<f32> = (0..t * cols)
                .map(|i| ((i * 31) % 13) as f32 / 13.0 - 0.5)
                .collect();
            for dt in [DType::F32, DType::F16, DType::BF16, DType::Q8_0] {
                let whole = Matrix::from_f32(rows, cols, &w, dt);
                let dt = whole.dtype(); // f32 for a quantized dtype when cols % 32 != 0
                let blocks = whole.clone().split_cols(block);
                let n = if dt.is_quantized() {
                    1
                } else {
                    cols.div_ceil(block)
                };
                assert_eq!(blocks.len(), n, "{dt:?} {rows}x{cols}/{block}");
                assert_eq!(blocks.iter().map(|b| b.cols).sum::<usize>(), cols);
                assert_eq!(
                    blocks.iter().map(|b| b.nbytes()).sum::<usize>(),
                    whole.nbytes()
                );
                let (mut a, mut b) = (vec![0f32; cols], vec![0f32; block.min(cols)]);
                for r in 0..rows {
                    whole.row_to_f32(r, &mut a);
                    let mut c0 = 0;
                    for m in &blocks {
                        assert_eq!((m.rows, m.dtype()), (rows, dt));
                        m.row_to_f32(r, &mut b[..m.cols]);
                        assert_eq!(&b[..m.cols], &a[c0..c0 + m.cols], "{dt:?} row {r} at {c0}");
                        c0 += m.cols;
                    }
                }
                let tol = |v: f32| 1e-5 * (1.0 + v.abs()) * cols as f32 / 32.0;
                let mut want = vec![0f32; rows];
                whole.matvec(&x[..cols], &mut want);
                for on_team in [false, true] {
                    let mut got = vec![f32::NAN; rows];
                    if on_team {
                        crate::team::with_team(&team, || {
                            matvec_blocks(&blocks, &x[..cols], &mut got)
                        });
                    } else {
                        matvec_blocks(&blocks, &x[..cols], &mut got);
                    }
                    for r in 0..rows {
                        assert!(
                            (got[r] - want[r]).abs() <= tol(want[r]),
                            "{dt:?} matvec {r}"
                        );
                    }
                }
                let mut want = vec![0f32; t * rows];
                whole.matmul(&x, t, &mut want);
                let mut got = vec![f32::NAN; t * rows];
                matmul_blocks(&blocks, &x, t, &mut got, |m, x, t, y| m.matmul(x, t, y));
                for i in 0..t * rows {
                    assert!(
                        (got[i] - want[i]).abs() <= tol(want[i]),
                        "{dt:?} matmul {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn gemv_layout_keeps_values_and_results() {
        // 16-row interleaving (where this CPU has the kernel): same rows, same GEMV results
        // to rounding, same AXPYs; matrices it does not apply to come back unchanged.
        for (rows, cols) in [(16usize, 32usize), (48, 96), (20, 64), (64, 2048)] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                .collect();
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * 31) % 13) as f32 / 13.0 - 0.5)
                .collect();
            for dt in [DType::Q4_0, DType::Q8_0] {
                let plain = Matrix::from_f32(rows, cols, &w, dt);
                let packed = plain.clone().into_gemv_layout();
                let has_kernel = match dt {
                    DType::Q4_0 => quant_kernels().gemv16_q4_0.is_some(),
                    _ => quant_kernels().gemv16_q8_0.is_some(),
                };
                let expect_packed =
                    has_kernel && rows % 16 == 0 && crate::quant::interleave_enabled();
                assert_eq!(
                    matches!(packed.data, Storage::Q4_0x16(_) | Storage::Q8_0x16(_)),
                    expect_packed,
                    "{dt:?} {rows}x{cols}"
                );
                assert_eq!(packed.dtype(), dt);
                assert_eq!(packed.nbytes(), plain.nbytes());
                let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
                for r in 0..rows {
                    plain.row_to_f32(r, &mut a);
                    packed.row_to_f32(r, &mut b);
                    assert_eq!(a, b, "row {r}");
                }
                let (mut ya, mut yb) = (vec![0f32; rows], vec![0f32; rows]);
                plain.matvec(&x, &mut ya);
                packed.matvec(&x, &mut yb);
                for r in 0..rows {
                    assert!(
                        (ya[r] - yb[r]).abs() <= 1e-5 * (1.0 + ya[r].abs()) * cols as f32 / 32.0,
                        "matvec row {r}"
                    );
                }
                // a single row through dot_rows at an offset that is not a multiple of 16
                let mut one = [0f32; 3];
                packed.dot_rows(rows - 3, &x, &mut one);
                for i in 0..3 {
                    assert!(
                        (one[i] - ya[rows - 3 + i]).abs()
                            <= 1e-5 * (1.0 + ya[rows - 3 + i].abs()) * cols as f32 / 32.0
                    );
                }
                let (mut pa, mut pb) = (vec![0.5f32; 32], vec![0.5f32; 32]);
                plain.axpy_row(rows - 1, cols - 32, 0.75, &mut pa);
                packed.axpy_row(rows - 1, cols - 32, 0.75, &mut pb);
                assert_eq!(pa, pb);
            }
        }
    }

    #[test]
    fn matvec_and_matmul_agree_with_naive() {
        for (rows, cols, t) in [(37, 53, 5), (8, 64, 8), (13, 16, 3), (4, 20, 4), (9, 96, 6)] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                .collect();
            let x: Vec<f32> = (0..t * cols)
                .map(|i| ((i * 31) % 13) as f32 / 13.0 - 0.5)
                .collect();
            for dt in [
                DType::F32,
                DType::F16,
                DType::BF16,
                DType::Q8_0,
                DType::Q4_0,
            ] {
                let m = Matrix::from_f32(rows, cols, &w, dt);
                // Quantized: compare against the dequantized weights with a quantized input
                // (error ~ |w|·|x| / 127 per term).
                let tol = match m.dtype() {
                    DType::Q8_0 | DType::Q4_0 => 0.05 * cols as f32 / 64.0,
                    _ => 1e-4,
                };
                let mut y = vec![0f32; t * rows];
                m.matmul(&x, t, &mut y);
                let mut row = vec![0f32; cols];
                for j in 0..t {
                    let mut yv = vec![0f32; rows];
                    m.matvec(&x[j * cols..(j + 1) * cols], &mut yv);
                    for r in 0..rows {
                        m.row_to_f32(r, &mut row);
                        let naive: f32 = row.iter().zip(&x[j * cols..]).map(|(a, b)| a * b).sum();
                        assert!((y[j * rows + r] - naive).abs() < 1e-4, "{dt:?} matmul");
                        assert!(
                            (yv[r] - naive).abs() < tol,
                            "{dt:?} matvec {} vs {naive}",
                            yv[r]
                        );
                    }
                }
            }
        }
    }
}
