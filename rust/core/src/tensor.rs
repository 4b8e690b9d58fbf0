//! `Matrix`: an owned row-major weight matrix `[rows, cols]` in f32, f16 or bf16, and the
//! row-level operations the model needs (dot with a vector, AXPY of a row into a vector).
//! Rows are the output features (PyTorch `[out, in]` layout), so a GEMV reads rows contiguously.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::kernels::kernels;

/// Storage precision of weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// The element buffer of a matrix.
#[derive(Debug, Clone)]
pub enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// Row-major `[rows, cols]` weights.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Storage,
}

impl Matrix {
    /// Build from f32 values, stored as `dtype` (round to nearest even).
    pub fn from_f32(rows: usize, cols: usize, v: &[f32], dtype: DType) -> Matrix {
        assert_eq!(v.len(), rows * cols, "Matrix::from_f32 length");
        let data = match dtype {
            DType::F32 => Storage::F32(v.to_vec()),
            DType::F16 => Storage::F16(v.par_iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => Storage::BF16(v.par_iter().map(|&x| bf16::from_f32(x)).collect()),
        };
        Matrix { rows, cols, data }
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
        }
    }

    /// Bytes held by the weights.
    pub fn nbytes(&self) -> usize {
        self.rows * self.cols * self.dtype().size()
    }

    /// `row[r][c0..c0+y.len()] · x`.
    #[inline]
    pub fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        let k = kernels();
        let (s, e) = (r * self.cols, r * self.cols + x.len());
        match &self.data {
            Storage::F32(w) => (k.dot_f32)(&w[s..e], x),
            Storage::F16(w) => (k.dot_f16)(&w[s..e], x),
            Storage::BF16(w) => (k.dot_bf16)(&w[s..e], x),
        }
    }

    /// `y += a · row[r][c0 .. c0 + y.len()]`.
    #[inline]
    pub fn axpy_row(&self, r: usize, c0: usize, a: f32, y: &mut [f32]) {
        let k = kernels();
        let s = r * self.cols + c0;
        let e = s + y.len();
        match &self.data {
            Storage::F32(w) => (k.axpy_f32)(a, &w[s..e], y),
            Storage::F16(w) => (k.axpy_f16)(a, &w[s..e], y),
            Storage::BF16(w) => (k.axpy_bf16)(a, &w[s..e], y),
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
        }
    }

    /// `y = W x` (`x: [cols]`, `y: [rows]`), rows split across the current rayon pool.
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) {
        debug_assert_eq!(x.len(), self.cols);
        debug_assert_eq!(y.len(), self.rows);
        let chunk = row_chunk(self.rows);
        y.par_chunks_mut(chunk).enumerate().for_each(|(ci, ys)| {
            for (i, yi) in ys.iter_mut().enumerate() {
                *yi = self.dot_row(ci * chunk + i, x);
            }
        });
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
        yt.par_chunks_mut(chunk * t).enumerate().for_each(|(ci, ys)| {
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
                            ys[(i + q) * t + j..(i + q) * t + j + 4].copy_from_slice(&tile[4 * q..4 * q + 4]);
                        }
                        j += 4;
                    }
                }
                for q in 0..g {
                    for jj in j..t {
                        ys[(i + q) * t + jj] =
                            (k.dot_f32)(&w[q * cols..(q + 1) * cols], &x[jj * cols..(jj + 1) * cols]);
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

/// Rows per parallel task: enough tasks to balance, few enough to keep overhead low.
fn row_chunk(rows: usize) -> usize {
    let tasks = rayon::current_num_threads().max(1) * 8;
    rows.div_ceil(tasks).clamp(16, 4096).min(rows.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matvec_and_matmul_agree_with_naive() {
        for (rows, cols, t) in [(37, 53, 5), (8, 64, 8), (13, 16, 3), (4, 20, 4)] {
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
        let x: Vec<f32> = (0..t * cols).map(|i| ((i * 31) % 13) as f32 / 13.0 - 0.5).collect();
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let m = Matrix::from_f32(rows, cols, &w, dt);
            let mut y = vec![0f32; t * rows];
            m.matmul(&x, t, &mut y);
            let mut row = vec![0f32; cols];
            for j in 0..t {
                let mut yv = vec![0f32; rows];
                m.matvec(&x[j * cols..(j + 1) * cols], &mut yv);
                for r in 0..rows {
                    m.row_to_f32(r, &mut row);
                    let naive: f32 = row.iter().zip(&x[j * cols..]).map(|(a, b)| a * b).sum();
                    assert!((y[j * rows + r] - naive).abs() < 1e-4, "{dt:?}");
                    assert!((yv[r] - naive).abs() < 1e-4, "{dt:?}");
                }
            }
        }
        }
    }
}
