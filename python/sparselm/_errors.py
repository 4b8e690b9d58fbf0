"""Typed exceptions raised by sparselm.

Every error the library raises derives from :class:`SparselmError`, and also from the builtin
exception that fits it, so ``except ValueError`` and ``except OSError`` keep working.
The native extension raises these classes directly (it looks them up here by name): this module
is the single place where the Rust error kinds become Python classes.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ContextLengthError",
    "DtypeError",
    "FormatError",
    "InvalidArgumentError",
    "MissingTensorError",
    "ModelIOError",
    "OutOfMemoryError",
    "SessionBusyError",
    "ShapeError",
    "SparselmError",
    "UnsupportedError",
]


class SparselmError(Exception):
    """Base class of every error raised by sparselm."""


class ModelIOError(SparselmError, OSError):
    """A model file could not be opened or read (missing, permissions, I/O failure)."""


class FormatError(SparselmError, ValueError):
    """A model file is malformed: truncated, corrupt header, bad offsets, bad JSON."""


class ConfigError(FormatError):
    """config.json is missing a field, has a value of the wrong type, or an invalid value."""


class MissingTensorError(FormatError):
    """A tensor the architecture needs is not in the checkpoint."""


class ShapeError(FormatError):
    """A tensor has a shape other than the one the config implies."""


class DtypeError(FormatError):
    """A tensor is stored in a dtype sparselm cannot read, or an unknown dtype was requested."""


class UnsupportedError(SparselmError, NotImplementedError):
    """A valid configuration that this version of sparselm does not implement."""


class ContextLengthError(SparselmError, ValueError):
    """The prompt (plus the tokens to generate) does not fit in the model's context."""


class InvalidArgumentError(SparselmError, ValueError):
    """An argument has an invalid value (sampling parameters, token ids, dtype names...)."""


class OutOfMemoryError(SparselmError, MemoryError):
    """A buffer could not be allocated (e.g. the KV cache of a very long context)."""


class SessionBusyError(SparselmError, RuntimeError):
    """A :class:`~sparselm.Session` was used while another call on it was running (from another
    thread, or from a signal handler during a call). A session serves one caller at a time."""


#: Map from the native error kind (see rust/py/src/errors.rs) to the class raised.
NATIVE_KINDS = {
    "io": ModelIOError,
    "format": FormatError,
    "config": ConfigError,
    "missing_tensor": MissingTensorError,
    "shape": ShapeError,
    "dtype": DtypeError,
    "unsupported": UnsupportedError,
    "context": ContextLengthError,
    "argument": InvalidArgumentError,
    "memory": OutOfMemoryError,
    "busy": SessionBusyError,
    # a stop asked for by the bindings on Ctrl-C; they raise the signal handler's own exception
    "interrupted": KeyboardInterrupt,
}
