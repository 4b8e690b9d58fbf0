//! The one place where core errors become Python exceptions: the class is looked up by
//! `Error::kind()` in `sparselm._errors.NATIVE_KINDS`, so Python owns the class hierarchy. Also
//! how native work runs: without the GIL, panics caught, long work interruptible by Ctrl-C.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use sparselm_core::{Control, Error};

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

/// A panic (a bug) as a SparselmError instead of an abort.
fn panic_err(py: Python<'_>, p: Box<dyn Any + Send>) -> PyErr {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    raise(
        py,
        "format",
        format!("internal error in sparselm (please report): {what}"),
    )
}

fn finish<T>(py: Python<'_>, r: std::thread::Result<Result<T, Error>>) -> PyResult<T> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_pyerr(py, e)),
        Err(p) => Err(panic_err(py, p)),
    }
}

/// Run `f` without the GIL, turning a panic (a bug) into a SparselmError instead of an abort.
pub fn nogil<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, Error> + Send) -> PyResult<T> {
    let r = py.detach(|| catch_unwind(AssertUnwindSafe(f)));
    finish(py, r)
}

/// How often the caller's thread looks for signals and reports progress in [`interruptible`].
const POLL: Duration = Duration::from_millis(20);

/// [`nogil`] for long work (a load, a prompt): `f` runs on a helper thread while the caller's
/// thread runs Python's signal handlers every 20 ms (only the main thread has any) and, with
/// `progress`, calls `progress(done, total)` whenever `f`'s [`Control`] has moved. When a
/// handler raises (Ctrl-C's `KeyboardInterrupt`) or `progress` does, `f` is asked to stop
/// through its `Control`, and that exception is raised once `f` has returned, whatever it
/// returned: the caller sees the same exception as if the work had been Python code.
pub fn interruptible<T: Send>(
    py: Python<'_>,
    progress: Option<&Bound<'_, PyAny>>,
    f: impl FnOnce(&Control) -> Result<T, Error> + Send,
) -> PyResult<T> {
    let ctl = Control::new();
    let (raised, out) = std::thread::scope(|s| {
        let (tx, rx) = channel::<()>();
        let ctl = &ctl;
        let worker = std::thread::Builder::new()
            .name("sparselm-call".into())
            .spawn_scoped(s, move || {
                let r = catch_unwind(AssertUnwindSafe(|| f(ctl)));
                let _ = tx.send(());
                r
            })
            .map_err(|e| to_pyerr(py, Error::Memory(format!("cannot start a thread: {e}"))))?;
        let mut raised: Option<PyErr> = None;
        let mut shown = (0, 0);
        let mut rx = Some(rx);
        loop {
            // (the receiver is not Sync: moved in and out of the GIL-free closure)
            let (got, back) = py.detach(|| {
                let r = rx.take().expect("receiver");
                (r.recv_timeout(POLL), r)
            });
            rx = Some(back);
            // Disconnected: the worker is gone (it always sends first)
            let finished = !matches!(got, Err(RecvTimeoutError::Timeout));
            if raised.is_none() {
                let mut report = || -> PyResult<()> {
                    let now = ctl.progress();
                    if let Some(cb) = progress.filter(|_| now != shown && now.1 > 0) {
                        shown = now;
                        cb.call1(now)?;
                    }
                    if finished {
                        Ok(()) // a pending signal fires in the caller's next bytecode
                    } else {
                        py.check_signals()
                    }
                };
                if let Err(e) = report() {
                    ctl.stop();
                    raised = Some(e);
                }
            }
            if finished {
                break;
            }
        }
        let out = py.detach(|| worker.join());
        Ok::<_, PyErr>((raised, out))
    })?;
    if let Some(e) = raised {
        return Err(e);
    }
    match out {
        Ok(r) => finish(py, r),
        Err(p) => Err(panic_err(py, p)),
    }
}
