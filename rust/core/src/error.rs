//! The one error type of the core. Every failure that can come from a file or a caller is a
//! variant here (never a panic); each carries the path, tensor name or shapes that explain it.
//! The Python bindings map `Error::kind()` to a Python exception class in one place.

use std::path::PathBuf;

/// Result alias used throughout the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is malformed (bad header, truncated, offsets out of range, bad JSON).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// config.json is incomplete or has invalid values.
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A tensor required by the architecture is absent.
    #[error("{path}: missing tensor '{name}'")]
    MissingTensor { path: PathBuf, name: String },
    /// A tensor has a shape other than the one the config implies.
    #[error("{path}: tensor '{name}' has shape {got:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A tensor is stored in a dtype we cannot read, or an unknown dtype was requested.
    #[error("{0}")]
    Dtype(String),
    /// A valid configuration this version does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// The tokens do not fit in the context.
    #[error("{needed} positions needed but the context holds {max} ({what})")]
    Context {
        needed: usize,
        max: usize,
        what: String,
    },
    /// A caller passed an invalid argument.
    #[error("{0}")]
    Argument(String),
    /// A buffer could not be allocated (e.g. a KV cache for a very long context).
    #[error("{0}")]
    Memory(String),
    /// The caller asked the work to stop ([`crate::Control::stop`]).
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    /// A stable short name of the variant; the bindings use it to pick the exception class.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Format { .. } => "format",
            Error::Config { .. } => "config",
            Error::MissingTensor { .. } => "missing_tensor",
            Error::Shape { .. } => "shape",
            Error::Dtype(_) => "dtype",
            Error::Unsupported(_) => "unsupported",
            Error::Context { .. } => "context",
            Error::Argument(_) => "argument",
            Error::Memory(_) => "memory",
            Error::Interrupted => "interrupted",
        }
    }

    /// A text file read whole: an I/O error, or a format error when it is not UTF-8.
    pub(crate) fn read_text(path: &std::path::Path) -> Result<String, Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        String::from_utf8(bytes)
            .map_err(|e| Error::format(path, format!("not UTF-8 text: {}", e.utf8_error())))
    }

    pub(crate) fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
