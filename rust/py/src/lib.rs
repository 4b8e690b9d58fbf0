//! sparselm-py: Python bindings of sparselm-core. Bindings only: argument conversion, GIL
//! release around every computation, error mapping (errors.rs). No numerics here.

mod errors;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use sparselm_core::control::NEVER;
use sparselm_core::{
    parse_dtype, AttnMode, Control, Error, Model, SamplingParams, Session as CoreSession,
};

use errors::{interruptible, nogil, raise, to_pyerr};

/// Weights and the KV cache on transparent huge pages (see `sparselm_core::alloc`). A global
/// allocator of this extension module serves the Rust code in it only, not Python's objects.
#[global_allocator]
static ALLOC: sparselm_core::alloc::HugePageAlloc = sparselm_core::alloc::HugePageAlloc;

/// The SIMD tier chosen at start-up.
#[pyfunction]
fn kernel_tier() -> &'static str {
    sparselm_core::kernels::kernels().tier.name()
}

/// What runs the bf16 prompt GEMMs: "amx-bf16" (Intel AMX tiles; Q8_0/Q4_0 projections on
/// AMX-INT8 where present), "avx512-bf16" or "none".
#[pyfunction]
fn prompt_engine() -> &'static str {
    sparselm_core::gemm::engine()
}

/// How quantized decode down projections store and read W_downᵀ: "rows", "groups", or "none"
/// where this CPU has no planar down kernel (they then use the row AXPY).
#[pyfunction]
fn down_layout() -> &'static str {
    if sparselm_core::quant::quant_kernels().down_q8_0.is_none() {
        return "none";
    }
    sparselm_core::quant::down_layout().name()
}

/// The thread count of `threads = 0`: one per physical core this process may run on.
#[pyfunction]
fn default_threads() -> usize {
    sparselm_core::cpu::default_threads()
}

/// GB/s of `passes` plain reads of a `mib`-MiB buffer on `threads` threads (see
/// `sparselm_core::membw`).
#[pyfunction]
#[pyo3(signature = (threads, mib = 512, passes = 3))]
fn read_bandwidth(py: Python<'_>, threads: usize, mib: usize, passes: usize) -> PyResult<Vec<f64>> {
    let bytes = mib
        .checked_mul(1 << 20)
        .ok_or_else(|| to_pyerr(py, Error::Argument(format!("mib={mib} is too large"))))?;
    nogil(py, move || {
        sparselm_core::membw::read_bandwidth(threads, bytes, passes)
    })
}

/// Run `f`, a forward pass of `tokens` tokens through `model`, without the GIL: through
/// [`interruptible`] when it is long enough, else with [`NEVER`] on this thread. The helper
/// thread costs ~0.1 ms a call here, and work that reads less than 64 MB of weights (a single
/// token of PLM-1.8B reads ~1 GB) takes only milliseconds.
fn run_forward<T: Send>(
    py: Python<'_>,
    model: &Model,
    tokens: usize,
    f: impl FnOnce(&Control) -> Result<T, Error> + Send,
) -> PyResult<T> {
    if tokens.saturating_mul(model.weights.nbytes()) >= 64 << 20 {
        interruptible(py, None, f)
    } else {
        nogil(py, move || f(&NEVER))
    }
}

fn ids_u32(py: Python<'_>, ids: Vec<i64>, vocab: usize) -> PyResult<Vec<u32>> {
    ids.iter()
        .map(|&t| {
            if t < 0 || t as u64 >= vocab as u64 {
                Err(to_pyerr(
                    py,
                    Error::Argument(format!("token id {t} is out of range [0, {vocab})")),
                ))
            } else {
                Ok(t as u32)
            }
        })
        .collect()
}

/// Immutable weights plus a thread pool.
#[pyclass(module = "sparselm._native", frozen)]
struct Engine {
    model: Arc<Model>,
}

#[pymethods]
impl Engine {
    /// Load `model_dir`. Ctrl-C stops the load between tensors; `progress(done, total)` is
    /// called from this thread as tensors are converted (an exception it raises stops the load
    /// and is raised here).
    #[new]
    #[pyo3(signature = (model_dir, dtype = "auto", threads = 0, progress = None))]
    fn new(
        py: Python<'_>,
        model_dir: PathBuf,
        dtype: &str,
        threads: usize,
        progress: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Engine> {
        let dt = parse_dtype(dtype).map_err(|e| to_pyerr(py, e))?;
        let model = interruptible(py, progress.as_ref(), move |ctl| {
            Model::load_with(&model_dir, dt, threads, ctl)
        })?;
        Ok(Engine {
            model: Arc::new(model),
        })
    }

    #[getter]
    fn config_json(&self) -> String {
        self.model.config.to_json().to_string()
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.model.dtype.name()
    }

    #[getter]
    fn threads(&self) -> usize {
        self.model.threads()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    #[getter]
    fn max_position_embeddings(&self) -> usize {
        self.model.config.max_position_embeddings
    }

    /// Arithmetic of multi-token (prompt) products: "bf16" (AVX512_BF16 GEMM), "int8" (int8
    /// GEMMs of the Q8_0/Q4_0 projections only) or "f32" (see `Model::prompt_gemm`).
    #[getter]
    fn prompt_gemm(&self) -> &'static str {
        self.model.prompt_gemm()
    }

    /// Bytes of weight matrices held in memory.
    #[getter]
    fn weight_bytes(&self) -> usize {
        self.model.weights.nbytes()
    }

    /// Full-prompt forward on a fresh cache: float32 [len(ids), vocab_size].
    fn logits<'py>(&self, py: Python<'py>, ids: Vec<i64>) -> PyResult<Bound<'py, PyAny>> {
        let v = self.model.config.vocab_size;
        let ids = ids_u32(py, ids, v)?;
        let n = ids.len();
        let model = self.model.clone();
        let out = run_forward(py, &self.model, n, move |ctl| {
            if n == 0 {
                return Err(Error::Argument(
                    "logits() needs at least one token id".into(),
                ));
            }
            // a cache of the prompt's length (not the whole context); a prompt longer than the
            // context fails in feed with a context error
            let ctx = model.config.max_position_embeddings;
            let mut s = CoreSession::new(model, n.min(ctx))?;
            Ok(s.feed_with(&ids, AttnMode::Auto, true, ctl)?.to_vec())
        })?;
        Ok(PyArray1::from_vec(py, out).reshape([n, v])?.into_any())
    }

    #[pyo3(signature = (max_seq = 0))]
    fn new_session(&self, py: Python<'_>, max_seq: usize) -> PyResult<Session> {
        let inner = CoreSession::new(self.model.clone(), max_seq).map_err(|e| to_pyerr(py, e))?;
        Ok(Session {
            inner: Mutex::new(inner),
        })
    }
}

/// One conversation: latent cache + ids + generation state. One call at a time: a call that
/// finds another one running (another thread, or a signal handler during a call) raises
/// `SessionBusyError` instead of waiting (a handler waiting for the call it interrupted would
/// wait forever).
#[pyclass(module = "sparselm._native", frozen)]
struct Session {
    inner: Mutex<CoreSession>,
}

impl Session {
    fn lock(&self, py: Python<'_>) -> PyResult<MutexGuard<'_, CoreSession>> {
        match self.inner.try_lock() {
            Ok(g) => Ok(g),
            // a panic is caught inside every call, so this is not reached; the data is intact
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => Err(raise(
                py,
                "busy",
                "this Session is in use by another call (from another thread, or from a \
                 signal handler during a call); a Session serves one caller at a time: give \
                 each thread its own (Model.session(), or Session.copy())"
                    .into(),
            )),
        }
    }
}

#[pymethods]
impl Session {
    #[getter]
    fn n_past(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.lock(py)?.n_past())
    }

    #[getter]
    fn max_seq(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.lock(py)?.max_seq())
    }

    #[getter]
    fn tokens(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        Ok(self.lock(py)?.tokens().to_vec())
    }

    #[getter]
    fn pending(&self, py: Python<'_>) -> PyResult<Option<u32>> {
        Ok(self.lock(py)?.pending())
    }

    #[getter]
    fn finish_reason(&self, py: Python<'_>) -> PyResult<Option<&'static str>> {
        Ok(self.lock(py)?.finish_reason().map(|f| f.name()))
    }

    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        self.lock(py)?.reset();
        Ok(())
    }

    fn truncate(&self, py: Python<'_>, n: usize) -> PyResult<()> {
        self.lock(py)?.truncate(n);
        Ok(())
    }

    /// An independent session with the same cached ids (see `CoreSession::try_clone`).
    fn copy(&self, py: Python<'_>) -> PyResult<Session> {
        let inner = self.lock(py)?;
        let copy = nogil(py, || inner.try_clone())?;
        Ok(Session {
            inner: Mutex::new(copy),
        })
    }

    #[pyo3(signature = (ids, attention = "auto", all_logits = false))]
    fn feed<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<i64>,
        attention: &str,
        all_logits: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut guard = self.lock(py)?;
        let inner = &mut *guard;
        let v = inner.model().config.vocab_size;
        let ids = ids_u32(py, ids, v)?;
        let mode = AttnMode::parse(attention).map_err(|e| to_pyerr(py, e))?;
        let n = ids.len();
        let model = Arc::clone(inner.model());
        let out = run_forward(py, &model, n, move |ctl| {
            Ok(inner.feed_with(&ids, mode, all_logits, ctl)?.to_vec())
        })?;
        // unlocked before Python objects are made (a finalizer they run may use the session)
        drop(guard);
        let arr = PyArray1::from_vec(py, out);
        if all_logits {
            Ok(arr.reshape([n, v])?.into_any())
        } else {
            Ok(arr.into_any())
        }
    }

    #[pyo3(signature = (prompt_ids, max_new_tokens, temperature = 0.0, top_k = 0, top_p = 1.0,
                        min_p = 0.0, repetition_penalty = 1.0, seed = None, stop_ids = Vec::new()))]
    fn start(
        &self,
        py: Python<'_>,
        prompt_ids: Vec<i64>,
        max_new_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repetition_penalty: f32,
        seed: Option<u64>,
        stop_ids: Vec<i64>,
    ) -> PyResult<()> {
        let mut guard = self.lock(py)?;
        let inner = &mut *guard;
        let v = inner.model().config.vocab_size;
        let prompt = ids_u32(py, prompt_ids, v)?;
        // ids outside u32 can never be sampled; dropped, not truncated onto a real id
        let stop: Vec<u32> = stop_ids
            .into_iter()
            .filter_map(|t| u32::try_from(t).ok())
            .collect();
        let params = SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            seed,
        };
        let fed = prompt.len() - inner.kept_prefix(&prompt);
        let model = Arc::clone(inner.model());
        run_forward(py, &model, fed, move |ctl| {
            inner.start_with(&prompt, params, max_new_tokens, &stop, ctl)
        })
    }

    fn next_token(&self, py: Python<'_>) -> PyResult<Option<u32>> {
        let mut guard = self.lock(py)?;
        let inner = &mut *guard;
        nogil(py, move || inner.next_token())
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        // read under the lock, unlocked before Python objects are made (a finalizer they run
        // may use the session)
        let (s, sparsity, skipped, dense) = {
            let inner = self.lock(py)?;
            let st = inner.state();
            let sparsity = st.sparsity().map(|sp| (sp, st.layer_sparsity()));
            let skipped = inner.down_bytes_skipped_per_token();
            (
                inner.stats().clone(),
                sparsity,
                skipped,
                inner.model().weights.nbytes(),
            )
        };
        let d = PyDict::new(py);
        d.set_item("prompt_tokens", s.prompt_tokens)?;
        d.set_item("prompt_seconds", s.prompt_seconds)?;
        d.set_item("decode_tokens", s.decode_tokens)?;
        d.set_item("decode_seconds", s.decode_seconds)?;
        if let Some((sp, layers)) = sparsity {
            d.set_item("mlp_sparsity", sp)?;
            d.set_item("layer_sparsity", layers)?;
            // Weight bytes of W_down not read per generated token (decode steps only).
            if let Some(skipped) = skipped {
                d.set_item("down_bytes_skipped_per_token", skipped)?;
                d.set_item("weight_bytes_per_token_dense", dense)?;
            }
        }
        Ok(d)
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // rust-numpy looks NumPy's C API up on first use by running Python code, where a pending
    // Ctrl-C fires and its error is unwrapped: a PanicException instead of KeyboardInterrupt
    // from the first logits()/feed() of a process. Do the lookup here, once, at import.
    let _ = numpy::PyArray1::<f32>::zeros(m.py(), 0, false);
    m.add_function(wrap_pyfunction!(kernel_tier, m)?)?;
    m.add_function(wrap_pyfunction!(prompt_engine, m)?)?;
    m.add_function(wrap_pyfunction!(down_layout, m)?)?;
    m.add_function(wrap_pyfunction!(read_bandwidth, m)?)?;
    m.add_function(wrap_pyfunction!(default_threads, m)?)?;
    m.add_class::<Engine>()?;
    m.add_class::<Session>()?;
    Ok(())
}
