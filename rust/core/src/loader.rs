//! Loading a Hugging Face PLM checkpoint directory: `config.json` plus `model.safetensors` or a
//! sharded `model.safetensors.index.json`. Files are memory-mapped, every header is validated by
//! the `safetensors` parser (offsets, lengths, overlaps), and every tensor is checked against the
//! tensor table (presence, dtype, shape) before any conversion or compute starts.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use serde_json::Value;

use crate::config::ModelConfig;
use crate::control::Control;
use crate::error::{Error, Result};
use crate::quant;
use crate::safetensors::{StDtype, StFile, TensorInfo};
use crate::tensor::{DType, Matrix, Storage, QBLOCK};
use crate::weights::{tensor_table, Down, LayerWeights, Role, Weights};

/// The safetensors files of a checkpoint and which file holds each tensor (sharded case).
fn checkpoint_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<HashMap<String, usize>>)> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok((vec![single], None));
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ),
        ));
    }
    let text = Error::read_text(&index)?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&index, format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::format(&index, "missing 'weight_map' object"))?;
    let mut files: Vec<PathBuf> = Vec::new();
    let mut which = HashMap::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::format(&index, format!("weight_map['{name}'] is not a file name"))
        })?;
        if file.is_empty() || file.contains(['/', '\\', '\0']) || file == "." || file == ".." {
            return Err(Error::format(
                &index,
                format!("shard name '{file}' must be a plain file name"),
            ));
        }
        let path = dir.join(file);
        let i = match files.iter().position(|p| *p == path) {
            Some(i) => i,
            None => {
                files.push(path);
                files.len() - 1
            }
        };
        which.insert(name.clone(), i);
    }
    Ok((files, Some(which)))
}

fn map_file(path: &Path) -> Result<Mmap> {
    // before opening: opening a FIFO for reading would block until a writer comes
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::format(path, "not a regular file"));
    }
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the mapping is read-only and private to this process; we only read it while the
    // Mmap lives. Concurrent truncation of the file by another process is outside our contract
    // (the same caveat as every mmap-based loader).
    unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))
}

fn file_dtype(d: &StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::F16 => Some(DType::F16),
        StDtype::BF16 => Some(DType::BF16),
        StDtype::Other(..) => None,
    }
}

/// Element `i` of a little-endian tensor of dtype `d`, as f32.
fn to_f32_vec(bytes: &[u8], d: DType) -> Vec<f32> {
    match d {
        DType::F32 => bytes
            .par_chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => bytes
            .par_chunks_exact(2)
            .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        // bf16 is the top half of an f32: a shift, exact for every value (NaN stays NaN),
        // and it vectorizes (`bf16::to_f32` quiets NaNs with a branch per element).
        DType::BF16 => bytes
            .par_chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        DType::Q8_0 | DType::Q4_0 => unreachable!("safetensors tensors are float (file_dtype)"),
    }
}

/// The rows of a float tensor (`bytes` in `src`) quantized into blocks, in parallel over
/// chunks of 256 rows: each chunk is widened to f32 and quantized straight into its place in
/// the one output buffer, so no f32 copy of the whole tensor, and no second copy of the
/// blocks, is ever held.
fn quantize_rows<B: Default + Clone + Send>(
    bytes: &[u8],
    src: DType,
    cols: usize,
    quantize: impl Fn(&[f32], &mut [B]) -> Result<()> + Sync,
) -> Vec<B> {
    let row_bytes = cols * src.bytes(1);
    let (rows, nb) = (bytes.len() / row_bytes.max(1), cols / QBLOCK);
    let chunk = 256.min(rows.max(1));
    let mut q = vec![B::default(); rows * nb];
    q.par_chunks_mut((chunk * nb).max(1))
        .zip(bytes.par_chunks(chunk * row_bytes))
        .for_each(|(o, b)| {
            let v = to_f32_vec(b, src);
            for (o, x) in o.chunks_mut(nb).zip(v.chunks(cols)) {
                quantize(x, o).expect("cols is a multiple of 32");
            }
        });
    q
}

fn to_storage(bytes: &[u8], src: DType, dst: DType, cols: usize) -> Storage {
    let bits = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
    if dst.is_quantized() && cols.is_multiple_of(QBLOCK) {
        return match dst {
            DType::Q8_0 => Storage::Q8_0(quantize_rows(bytes, src, cols, |x, o| {
                quant::quantize_row_q8_0(x, o)
            })),
            _ => Storage::Q4_0(quantize_rows(bytes, src, cols, |x, o| {
                quant::quantize_row_q4_0(x, o)
            })),
        };
    }
    let dst = if dst.is_quantized() { DType::F32 } else { dst }; // cols % 32 ≠ 0
    match (src, dst) {
        (DType::F16, DType::F16) => Storage::F16(
            bytes
                .par_chunks_exact(2)
                .map(|b| f16::from_bits(bits(b)))
                .collect(),
        ),
        (DType::BF16, DType::BF16) => Storage::BF16(
            bytes
                .par_chunks_exact(2)
                .map(|b| bf16::from_bits(bits(b)))
                .collect(),
        ),
        (_, DType::F32) => Storage::F32(to_f32_vec(bytes, src)),
        (_, DType::F16) => Storage::F16(
            to_f32_vec(bytes, src)
                .par_iter()
                .map(|&x| f16::from_f32(x))
                .collect(),
        ),
        (_, DType::BF16) => Storage::BF16(
            to_f32_vec(bytes, src)
                .par_iter()
                .map(|&x| bf16::from_f32(x))
                .collect(),
        ),
        (_, DType::Q8_0 | DType::Q4_0) => unreachable!("handled above"),
    }
}

/// `[rows, cols]` → `[cols, rows]`, in parallel over blocks of output rows.
fn transpose<T: Copy + Default + Send + Sync>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    // Output rows in parallel bands of B; inside, T×T tiles go through a local buffer so the
    // strided side touches each cache line once. (Writing column by column straight into the
    // output put 64 lines 8 KiB apart in one L1 set: 30 % of a PLM-1.8B q4_0 load.)
    const B: usize = 64;
    const T: usize = 16;
    let mut out = vec![T::default(); rows * cols];
    out.par_chunks_mut(B * rows)
        .enumerate()
        .for_each(|(bi, blk)| {
            let c0 = bi * B;
            let nc = blk.len() / rows;
            let mut tile = [T::default(); T * T];
            for r0 in (0..rows).step_by(T) {
                let nr = T.min(rows - r0);
                for j0 in (0..nc).step_by(T) {
                    let nj = T.min(nc - j0);
                    for r in 0..nr {
                        let src = &v[(r0 + r) * cols + c0 + j0..][..nj];
                        for (j, &x) in src.iter().enumerate() {
                            tile[j * T + r] = x;
                        }
                    }
                    for j in 0..nj {
                        blk[(j0 + j) * rows + r0..][..nr].copy_from_slice(&tile[j * T..j * T + nr]);
                    }
                }
            }
        });
    out
}

fn transpose_storage(s: Storage, rows: usize, cols: usize) -> Storage {
    match s {
        Storage::F32(v) => Storage::F32(transpose(&v, rows, cols)),
        Storage::F16(v) => Storage::F16(transpose(&v, rows, cols)),
        Storage::BF16(v) => Storage::BF16(transpose(&v, rows, cols)),
        Storage::Q8_0(_)
        | Storage::Q4_0(_)
        | Storage::Q4_0x16(_)
        | Storage::Q8_0x16(_)
        | Storage::Q4_0P(_)
        | Storage::Q8_0P(_) => {
            unreachable!("quantize after transposing")
        }
    }
}

/// Drop the file pages of `bytes` (a slice of `map`) from the resident set once converted, so
/// peak memory is the converted weights plus about one tensor, not weights + whole file.
fn release(map: &Mmap, bytes: &[u8]) {
    #[cfg(unix)]
    {
        // 64 KiB: a multiple of every Linux page size (4/16/64 KiB), as madvise needs.
        const ALIGN: usize = 64 << 10;
        let start = bytes.as_ptr() as usize - map.as_ptr() as usize;
        let (s, e) = (
            start.div_ceil(ALIGN) * ALIGN,
            (start + bytes.len()) / ALIGN * ALIGN,
        );
        if e > s {
            // SAFETY: a private, read-only file mapping: MADV_DONTNEED drops clean pages that the
            // kernel re-reads from the file if they are touched again, so no byte any Rust
            // reference can observe changes.
            let _ =
                unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, s, e - s) };
        }
    }
    #[cfg(not(unix))]
    let _ = (map, bytes);
}

/// A loaded tensor before it is placed into `Weights`.
enum Loaded {
    Norm(Vec<f32>),
    Mat(Matrix),
}

/// Load and validate every tensor of the checkpoint in `dir`.
///
/// `want`: the storage dtype of weight matrices; `None` keeps the checkpoint's dtype (that of
/// `model.embed_tokens.weight`). Norm gains are always f32. `dense_down`: keep a quantized
/// `W_down` as in the file, in the GEMV layout (float formats in column blocks), for a dense
/// MLP (`Down::Dense`) instead of transposed for the sparse one (`Down::Transposed`).
/// `ctl` counts the tensors converted and is checked before each: a stop request ends the load
/// with [`Error::Interrupted`], dropping what was converted.
pub fn load_weights(
    dir: &Path,
    cfg: &ModelConfig,
    want: Option<DType>,
    dense_down: bool,
    ctl: &Control,
) -> Result<(Weights, DType)> {
    let (files, which) = checkpoint_files(dir)?;
    let maps: Vec<Mmap> = files.iter().map(|p| map_file(p)).collect::<Result<_>>()?;
    let parsed: Vec<StFile<'_>> = maps
        .iter()
        .zip(&files)
        .map(|(m, p)| StFile::parse(p, m))
        .collect::<Result<_>>()?;

    let find = |name: &str| -> Result<(&TensorInfo, usize)> {
        let candidates: Vec<usize> = match &which {
            Some(w) => match w.get(name) {
                Some(&i) => vec![i],
                None => {
                    return Err(Error::MissingTensor {
                        path: dir.join("model.safetensors.index.json"),
                        name: name.into(),
                    })
                }
            },
            None => vec![0],
        };
        for i in candidates {
            if let Some(t) = parsed[i].tensors.get(name) {
                return Ok((t, i));
            }
        }
        let path = match &which {
            Some(w) => files[w[name]].clone(),
            None => files[0].clone(),
        };
        Err(Error::MissingTensor {
            path,
            name: name.into(),
        })
    };

    // 1. Validate everything before converting anything.
    let table = tensor_table(cfg);
    let mut views = Vec::with_capacity(table.len());
    for spec in &table {
        let (info, fi) = find(&spec.name)?;
        let path = &files[fi];
        let dt = file_dtype(&info.dtype).ok_or_else(|| {
            Error::Dtype(format!(
                "{}: tensor '{}' has dtype {}; sparselm reads F32, F16 and BF16 weights",
                path.display(),
                spec.name,
                info.dtype.name()
            ))
        })?;
        if info.shape != spec.shape {
            return Err(Error::Shape {
                path: path.to_path_buf(),
                name: spec.name.clone(),
                expected: spec.shape.clone(),
                got: info.shape.clone(),
            });
        }
        views.push((parsed[fi].bytes(info), dt, fi));
    }
    let out_dtype = want.unwrap_or(views[0].1);

    // 2. Convert (each conversion is itself parallel).
    let mut loaded: Vec<Loaded> = Vec::with_capacity(table.len());
    ctl.begin(table.len());
    for (spec, &(bytes, dt, fi)) in table.iter().zip(&views) {
        ctl.check()?;
        let dt = &dt;
        // `W_down` kept as in the file for the dense GEMV (`Down::Dense`)
        let role = match spec.role {
            Role::MatrixTransposed if dense_down => Role::Matrix,
            role => role,
        };
        loaded.push(match role {
            Role::Norm => Loaded::Norm(to_f32_vec(bytes, *dt)),
            Role::Matrix => {
                let (r, c) = (spec.shape[0], spec.shape[1]);
                let dst = if out_dtype.is_quantized() && c % QBLOCK != 0 {
                    DType::F32
                } else {
                    out_dtype
                };
                Loaded::Mat(Matrix {
                    rows: r,
                    cols: c,
                    data: to_storage(bytes, *dt, dst, c),
                })
            }
            Role::MatrixTransposed if out_dtype.is_quantized() => {
                // Transpose in f32, then quantize along the hidden dimension (rows of W_downᵀ).
                let (r, c) = (spec.shape[0], spec.shape[1]);
                let t = transpose(&to_f32_vec(bytes, *dt), r, c);
                Loaded::Mat(Matrix::from_f32(c, r, &t, out_dtype))
            }
            Role::MatrixTransposed => {
                let (r, c) = (spec.shape[0], spec.shape[1]);
                Loaded::Mat(Matrix {
                    rows: c,
                    cols: r,
                    data: transpose_storage(to_storage(bytes, *dt, out_dtype, c), r, c),
                })
            }
        });
        release(&maps[fi], bytes);
        ctl.step();
    }
    drop(views);

    // 3. Place into the typed structure (same order as tensor_table).
    let mut it = loaded.into_iter();
    let embed = match it.next() {
        Some(Loaded::Mat(m)) => m,
        _ => unreachable!("tensor_table order: embedding first"),
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for _ in 0..cfg.num_hidden_layers {
        let mut next = || it.next().expect("tensor_table length");
        let norm = |l: Loaded| match l {
            Loaded::Norm(v) => v,
            Loaded::Mat(_) => unreachable!("tensor_table order: norm expected"),
        };
        let m = |l: Loaded| match l {
            Loaded::Mat(m) => m,
            Loaded::Norm(_) => unreachable!("tensor_table order: matrix expected"),
        };
        // GEMV-only matrices may take an interleaved layout (Matrix::into_gemv_layout), AXPY
        // ones the planar layout of the int8 AXPY kernel (Matrix::into_down_layout). kv_b_proj
        // is split into its k_nope rows (W_UK, summed as rows in absorbed decode) and v rows
        // (W_UV, a GEMV) so each half takes its layout.
        let input_norm = norm(next());
        let q_proj = m(next()).into_gemv_layout();
        let kv_a = m(next()).into_gemv_layout();
        let kv_a_norm = norm(next());
        let (nh, dn, dv) = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.v_head_dim,
        );
        let kv_b = m(next());
        let kv_bk = kv_b.select_rows((0..nh).flat_map(|h| h * (dn + dv)..h * (dn + dv) + dn));
        let kv_bv = kv_b.select_rows((0..nh).flat_map(|h| h * (dn + dv) + dn..(h + 1) * (dn + dv)));
        drop(kv_b);
        layers.push(LayerWeights {
            input_norm,
            q_proj,
            kv_a,
            kv_a_norm,
            kv_bk: kv_bk.into_down_layout(),
            kv_bv: kv_bv.into_gemv_layout(),
            o_proj: m(next()).into_gemv_layout(),
            post_norm: norm(next()),
            up: m(next()).into_gemv_layout(),
            down: if dense_down {
                // float formats in column blocks whose inputs stay in L1 (`matvec_blocks`)
                Down::Dense(
                    m(next())
                        .into_gemv_layout()
                        .split_cols(crate::tensor::DOWN_COL_BLOCK),
                )
            } else {
                Down::Transposed(m(next()).into_down_layout())
            },
        });
    }
    let norm = match it.next() {
        Some(Loaded::Norm(v)) => v,
        _ => unreachable!("tensor_table order: final norm"),
    };
    let lm_head = match it.next() {
        Some(Loaded::Mat(m)) => Some(m),
        _ => None,
    };
    // The output projection is a GEMV per token (embedding lookups take single rows out).
    let embed = embed.into_gemv_layout();
    let lm_head = lm_head.map(Matrix::into_gemv_layout);
    Ok((
        Weights {
            embed,
            layers,
            norm,
            lm_head,
        },
        out_dtype,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_any_shape() {
        for (rows, cols) in [
            (1, 1),
            (1, 5),
            (5, 1),
            (16, 16),
            (37, 53),
            (64, 130),
            (130, 64),
            (17, 200),
        ] {
            let v: Vec<u32> = (0..rows * cols).map(|i| i as u32).collect();
            let t = transpose(&v, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        t[c * rows + r],
                        v[r * cols + c],
                        "{rows}x{cols} at ({r}, {c})"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_widening_is_exact() {
        let vals = [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            3.0e38,
            1.0e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        let got = to_f32_vec(&bytes, DType::BF16);
        for (g, &x) in got.iter().zip(&vals) {
            assert_eq!(g.to_bits(), bf16::from_f32(x).to_f32().to_bits());
        }
        let nan = to_f32_vec(&bf16::NAN.to_le_bytes(), DType::BF16);
        assert!(nan[0].is_nan());
    }

    #[test]
    fn transpose_matches_definition() {
        for (r, c) in [(1, 1), (3, 130), (67, 5), (128, 64)] {
            let v: Vec<u32> = (0..(r * c) as u32).collect();
            let t = transpose(&v, r, c);
            for i in 0..r {
                for j in 0..c {
                    assert_eq!(t[j * r + i], v[i * c + j]);
                }
            }
        }
    }
}
