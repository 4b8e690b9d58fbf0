"""sparselm: PLM-architecture language models (MLA attention + squared-ReLU MLP) on CPUs.

Quick start::

    import sparselm

    model = sparselm.load()                      # the tiny bundled model; or load("path/to/dir")
    print(model.generate("Once upon a time", max_new_tokens=32))
    for piece in model.chat([{"role": "user", "content": "Hi!"}], stream=True):
        print(piece, end="", flush=True)

    session = model.session()                    # multi-turn chat reusing the KV cache
    session.chat("Hello")
    session.chat("And then?")

The numerics live in the Rust extension ``sparselm._native``, imported on first use (by
:func:`load` or :func:`kernel_tier`); importing this package never imports torch or transformers.
Every error raised derives from :class:`SparselmError` and from the fitting builtin exception.
"""

from __future__ import annotations

from ._errors import (
    ConfigError,
    ContextLengthError,
    DtypeError,
    FormatError,
    InvalidArgumentError,
    MissingTensorError,
    ModelIOError,
    OutOfMemoryError,
    SessionBusyError,
    ShapeError,
    SparselmError,
    UnsupportedError,
)
from .generation import GenerationConfig, GenerationStats
from .model import (
    DTYPES,
    Model,
    ModelConfig,
    Session,
    bundled_model_path,
    default_threads,
    down_layout,
    kernel_tier,
    load,
    max_threads,
    memory_bandwidth,
    prompt_engine,
)
from .tokenizer import Tokenizer


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparselm")
    except PackageNotFoundError:  # running from a source tree without an installed dist
        return "0+unknown"


__version__: str = _version()

__all__ = [
    "DTYPES",
    "ConfigError",
    "ContextLengthError",
    "DtypeError",
    "FormatError",
    "GenerationConfig",
    "GenerationStats",
    "InvalidArgumentError",
    "MissingTensorError",
    "Model",
    "ModelConfig",
    "ModelIOError",
    "OutOfMemoryError",
    "Session",
    "SessionBusyError",
    "ShapeError",
    "SparselmError",
    "Tokenizer",
    "UnsupportedError",
    "__version__",
    "bundled_model_path",
    "default_threads",
    "down_layout",
    "kernel_tier",
    "load",
    "max_threads",
    "memory_bandwidth",
    "prompt_engine",
]
