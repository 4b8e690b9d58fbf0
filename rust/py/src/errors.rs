//! The one place where core errors become Python exceptions: the class is looked up by
//! `Error::kind()` in `sparselm._errors.NATIVE_KINDS`, so Python owns the class hierarchy.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use sparselm_core::Error;

pub fn to_pyerr(py: Python<'_>, e: Error) -> PyErr {
    raise(py, e.kind(), e.to_string())
}

/// A `kind` exception of sparselm._errors with `msg`.
pub fn raise(py: Python<'_>, kind: &str, msg: String) -> PyErr {
    let class = py
        .import("sparselm._errors")
        .and_then(|m| m.getattr("NATIVE_KINDS"))
        .and_then(|d| d.get_item(kind));
    match class.and_then(|c| c.call1((msg.clone(),))) {
        Ok(inst) => PyErr::from_value(inst),
        Err(_) => PyRuntimeError::new_err(msg),
    }
}

/// Run `f` without the GIL, turning a panic (a bug) into a SparselmError instead of an abort.
pub fn nogil<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, Error> + Send) -> PyResult<T> {
    let r = py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_pyerr(py, e)),
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(raise(
                py,
                "format",
                format!("internal error in sparselm (please report): {what}"),
            ))
        }
    }
}
