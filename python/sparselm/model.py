"""Loading a model and running it: :func:`load`, :class:`Model` and :class:`Session`.

This module owns paths (resolving the model directory, the bundled model, clear errors naming
them), argument validation and defaults, and the glue between the tokenizer, the generation loop
(:mod:`sparselm.generation`) and the native engine. It holds no numerics.

The native extension is imported lazily, on the first call that needs it (:func:`load`,
:func:`kernel_tier`): ``import sparselm`` works without it, so the tokenizer, the chat template
and :class:`~sparselm.GenerationConfig` are usable (and testable) on their own, and a missing or
broken build is reported with an explanation when it is first needed. :class:`Model` itself
talks to any object with the ``_native.Engine`` interface, which is how the pure-Python tests run
it against a fake engine.
"""

from __future__ import annotations

import copy as _copy
import itertools
import json
import os
import statistics
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Union, overload

from ._errors import ContextLengthError, DtypeError, FormatError, InvalidArgumentError, ModelIOError
from .generation import (
    GenerationConfig,
    GenerationRun,
    GenerationStats,
    NativeSession,
    StopArg,
    as_id_list,
    is_int,
)
from .tokenizer import Message, Tokenizer, read_json_object, validate_messages

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "DTYPES",
    "Model",
    "ModelConfig",
    "Session",
    "bundled_model_path",
    "down_layout",
    "kernel_tier",
    "load",
    "max_threads",
    "memory_bandwidth",
    "prompt_engine",
]

#: The weight formats :func:`load` accepts. ``"auto"`` keeps the checkpoint's own dtype. The
#: ``"q8_0"``/``"q4_0"`` quantize on load.
DTYPES = ("auto", "f32", "f16", "bf16", "q8_0", "q4_0")
# The block-quantized formats: the ones whose decode down projection has a layout
# (``down_layout()``) and int8 kernels.
QUANTIZED_DTYPES = ("q8_0", "q4_0")

#: Attention modes of :meth:`Session.feed`.
ATTENTION_MODES = ("auto", "dense", "absorbed")

#: A prompt: text, or token ids (a sequence or a 1-D NumPy array of ints).
Prompt = Union[str, Sequence[int], "npt.NDArray[Any]"]

PathLike = Union[str, "os.PathLike[str]"]

_BUNDLED_MODEL = Path(__file__).resolve().parent / "models" / "plm-tiny"


class NativeEngine(Protocol):
    """The part of ``sparselm._native.Engine`` a :class:`Model` uses (see ``_native.pyi``)."""

    @property
    def config_json(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def threads(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def max_position_embeddings(self) -> int: ...
    @property
    def prompt_gemm(self) -> str: ...
    def logits(self, ids: Sequence[int]) -> npt.NDArray[np.float32]: ...
    def new_session(self, max_seq: int = 0) -> NativeSession: ...


# --------------------------------------------------------------------------------------------
# The native extension, imported on first use
# --------------------------------------------------------------------------------------------


def _load_native() -> ModuleType:
    """Import ``sparselm._native``, or raise an ImportError that says what to do."""
    try:
        from . import _native
    except ImportError as exc:
        raise ImportError(
            f"sparselm's native extension (sparselm._native) could not be imported: {exc}. "
            "It is built by maturin: install a wheel with `pip install sparselm`, or from a "
            "source checkout run `pip install .` or `maturin develop --release` (needs a Rust "
            "toolchain >= 1.89). If you are running from the source tree, make sure the "
            "installed package, not the bare python/ directory, is first on sys.path."
        ) from exc
    return _native


def kernel_tier() -> str:
    """The SIMD kernel tier the native engine chose at start-up for this CPU.

    One of ``"scalar"``, ``"avx2"``, ``"avx512"``, ``"neon"``, ``"neon-dotprod"``. The
    ``SPARSELM_KERNEL`` environment variable can force a lower tier (set it before import).
    """
    return str(_load_native().kernel_tier())


def prompt_engine() -> str:
    """The hardware that runs the bf16 prompt GEMMs (``Model.prompt_gemm == "bf16"``).

    ``"amx-bf16"``: Intel AMX tiles (Sapphire Rapids and later; Linux grants the tile state):
    bf16 tiles for float weights and, where the CPU also has AMX-INT8, int8 tiles for the
    Q8_0/Q4_0 projections (bit-identical to their per-token GEMVs);
    ``"avx512-bf16"``: AVX512_BF16 vector instructions, ``"none"``: no bf16 GEMM on this CPU.
    Both engines round to bfloat16 and sum in float32; only the order of the sums differs. The
    ``SPARSELM_AMX=0`` environment variable (set before import) keeps prompts off the tiles.
    """
    return str(_load_native().prompt_engine())


def down_layout() -> str:
    """How Q8_0/Q4_0 models store and read ``W_down`` for the sparse decode down projection.

    ``"rows"``: each row of ``W_downᵀ`` is one contiguous piece and only the rows of active
    neurons are read (the default on Intel CPUs); ``"groups"``: 128-byte pieces, and a
    group of 32 rows with at least 12 active ones is read whole (the default elsewhere);
    ``"none"``: this CPU has no planar down kernel (AVX-512 VNNI + VBMI), rows are summed one
    at a time. The ``SPARSELM_DOWN_LAYOUT=rows|groups`` environment variable (set before
    import) overrides the default. Results agree within the format's rounding either way.
    """
    return str(_load_native().down_layout())


def default_threads() -> int:
    """The number of threads ``load(threads=None)`` runs: one per physical core this process
    may run on (its CPU affinity; two hardware threads of one core count once), at most
    ``os.cpu_count()``.

    Decode is bound by memory bandwidth, which a second hardware thread per core barely adds
    to. Where the CPU topology cannot be read (outside Linux), every logical CPU counts.
    """
    return int(_load_native().default_threads())


def memory_bandwidth(threads: int | None = None, mib: int = 512, passes: int = 3) -> float:
    """This machine's read bandwidth right now, in GB/s: the median of ``passes`` plain reads
    of a ``mib``-MiB buffer on ``threads`` threads (default: :func:`default_threads`).

    Decode speed is bound by memory, and on shared machines the bandwidth drifts (the
    reference VM moves between ~33 and ~60 GB/s with 2 threads), so benchmarks pair their
    timings with this figure. Takes about ``mib`` MiB of memory for a fraction of a second.

    Raises:
        InvalidArgumentError: ``threads``, ``mib`` or ``passes`` is not a positive integer.
    """
    if threads is None:
        threads = default_threads()
    for name, v in (("threads", threads), ("mib", mib), ("passes", passes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {v!r}")
    return float(statistics.median(_load_native().read_bandwidth(threads, mib, passes)))


def bundled_model_path() -> Path:
    """Directory of the tiny PLM model shipped inside the package (may be absent in some builds)."""
    return _BUNDLED_MODEL


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


class ModelConfig(Mapping[str, Any]):
    """The model's validated ``config.json`` (Hugging Face field names), read-only.

    A mapping (``config["hidden_size"]``, ``"q_lora_rank" in config``) that also allows attribute
    access (``config.hidden_size``). Nested objects are read-only too; :meth:`to_dict` returns a
    mutable deep copy.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_data", {k: _freeze(v) for k, v in data.items()})

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Parse the JSON object string of ``Engine.config_json``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FormatError(f"the engine's config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise FormatError("the engine's config is not a JSON object")
        return cls(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, name: str) -> Any:
        # (only called for names not found otherwise; `_data` itself is missing on an object
        # that copy/pickle made with __new__: looking it up here would recurse forever)
        if name == "_data" or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"config has no field {name!r}") from None

    def __reduce__(self) -> tuple[Any, ...]:
        # copy, deepcopy and pickle (a spawn Pool's arguments) rebuild it from a plain dict
        return (ModelConfig, (self.to_dict(),))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ModelConfig is read-only")

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._data))

    def to_dict(self) -> dict[str, Any]:
        """A mutable deep copy as plain dicts and lists."""
        return {k: _thaw(v) for k, v in self._data.items()}

    def to_json(self, indent: int | None = 2) -> str:
        """The config as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def __repr__(self) -> str:
        keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
        shown = ", ".join(f"{k}={self._data[k]!r}" for k in keys if k in self._data)
        return f"ModelConfig({shown}, ... {len(self._data)} fields)"

    def num_parameters(self) -> int | None:
        """Parameter count implied by a PLM/MLA config, or None when fields are missing."""
        return _count_parameters(self)


def _count_parameters(c: Mapping[str, Any]) -> int | None:
    # Shapes from docs/plm-architecture.md §2; an optional DeepSeek-V2 style q LoRA.
    try:
        d = int(c["hidden_size"])
        n_layers = int(c["num_hidden_layers"])
        heads = int(c["num_attention_heads"])
        vocab = int(c["vocab_size"])
        inter = int(c["intermediate_size"])
        r = int(c["kv_lora_rank"])
        nope = int(c["qk_nope_head_dim"])
        rope = int(c["qk_rope_head_dim"])
        v = int(c["v_head_dim"])
    except (KeyError, TypeError, ValueError):
        return None
    q_lora = c.get("q_lora_rank")
    qk = heads * (nope + rope)
    if q_lora:
        q = int(q_lora) * d + int(q_lora) + qk * int(q_lora)  # q_a_proj, q_a_layernorm, q_b_proj
    else:
        q = qk * d  # q_proj
    attn = q + (r + rope) * d + r + heads * (nope + v) * r + heads * v * d
    mlp = 2 * inter * d
    per_layer = attn + mlp + 2 * d  # + input/post-attention norms
    embed = vocab * d
    lm_head = 0 if c.get("tie_word_embeddings", True) else vocab * d
    return n_layers * per_layer + embed + lm_head + d  # + final norm


# --------------------------------------------------------------------------------------------
# load()
# --------------------------------------------------------------------------------------------


def _check_dtype(dtype: Any) -> str:
    if not isinstance(dtype, str):
        raise InvalidArgumentError(f"dtype must be a string, one of {', '.join(DTYPES)}")
    if dtype not in DTYPES:
        raise DtypeError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return dtype


def max_threads() -> int:
    """The most threads ``load(threads=...)`` accepts: 8 per CPU this process may run on, at
    least 64. Decode threads spin between the ~200 short parallel regions of a token, so more
    threads than CPUs only slow it down, and thousands took minutes just to start."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(64, 8 * cpus)


def _check_threads(threads: Any) -> int:
    if threads is None:
        return 0  # native: one per physical core (default_threads())
    if not is_int(threads) or threads < 1:
        raise InvalidArgumentError(f"threads must be None or an int >= 1, got {threads!r}")
    if threads > (limit := max_threads()):
        raise InvalidArgumentError(
            f"threads={threads} is more than this machine can use: at most {limit} "
            "(8 per CPU available to this process); None picks one per physical core"
        )
    return int(threads)


def _check_max_seq(max_seq: Any, what: str = "max_seq") -> int | None:
    if max_seq is None:
        return None
    if not is_int(max_seq) or max_seq < 1:
        raise InvalidArgumentError(f"{what} must be None or an int >= 1, got {max_seq!r}")
    return int(max_seq)


def resolve_model_dir(path: PathLike | None) -> Path:
    """The model directory for ``path`` (None: the bundled model), checked to exist.

    Raises ModelIOError naming the path when it does not exist or is not a directory.
    """
    if path is None:
        d = _BUNDLED_MODEL
        if not (d / "config.json").is_file():
            raise ModelIOError(
                f"the bundled model is not present in this installation (expected {d}); "
                "give the path of a model directory instead"
            )
        return d
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"path must be a str or os.PathLike (a model directory), got {type(path).__name__}"
        )
    raw = os.fspath(path)
    if not raw:
        raise InvalidArgumentError("path must not be empty")
    d = Path(raw).expanduser()
    try:
        exists, is_dir = d.exists(), d.is_dir()
    except OSError as exc:  # e.g. a name too long, or a component not searchable
        raise ModelIOError(f"cannot open the model directory {raw!r}: {exc}") from exc
    if not exists:
        raise ModelIOError(f"model directory not found: {raw}")
    if not is_dir:
        hint = f"; did you mean {d.parent}?" if d.suffix in (".json", ".safetensors") else ""
        raise ModelIOError(
            "expected a model directory (with config.json, model.safetensors and "
            f"tokenizer.json), got a file: {raw}{hint}"
        )
    d = d.resolve()
    if not (d / "config.json").is_file():
        raise ModelIOError(f"not a model directory: no config.json in {d}")
    return d


def _read_generation_config(d: Path) -> GenerationConfig | None:
    p = d / "generation_config.json"
    if not p.is_file():
        return None
    data = read_json_object(p)
    try:
        return GenerationConfig.from_hf_dict(data)
    except InvalidArgumentError as exc:
        raise FormatError(f"{p}: {exc}") from exc


class _LoadBar:
    """A tqdm bar of the tensors a native load has converted, fed by its ``progress`` calls.

    ``show=None`` draws it only on a terminal and only once the load has taken a second (the
    bundled model loads in milliseconds); ``True`` always, at once.
    """

    def __init__(self, show: bool | None, desc: str) -> None:
        self._show, self._desc = show, desc
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=self._desc,
                unit="tensor",
                disable=None if self._show is None else False,
                delay=1.0 if self._show is None else 0.0,
                leave=False,
            )
        self._bar.update(done - self._bar.n)
        if done == total and self._show:
            self._bar.refresh()  # a fast load's only call: show it whole, not 0/total

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def load(
    path: PathLike | None = None,
    *,
    dtype: str = "auto",
    threads: int | None = None,
    max_seq: int | None = None,
    progress: bool | None = None,
) -> Model:
    """Load a PLM checkpoint directory.

    Args:
        path: A Hugging Face style directory with ``config.json``, ``model.safetensors`` (or
            shards with ``model.safetensors.index.json``), ``tokenizer.json`` and optionally
            ``tokenizer_config.json`` / ``generation_config.json``. ``None`` loads the tiny model
            bundled with the package.
        dtype: Weight format in memory: ``"auto"`` (the file's dtype), ``"f32"``, ``"f16"``,
            ``"bf16"``, ``"q8_0"`` or ``"q4_0"``.
        threads: Worker threads (``None``: one per physical core, see :func:`default_threads`;
            at most :func:`max_threads`).
        max_seq: Default context length of sessions (``None``: the model's
            ``max_position_embeddings``). Smaller values use less KV-cache memory.
        progress: A progress bar (tqdm, on stderr) of the tensors converted: ``None`` shows
            one when stderr is a terminal and the load takes over a second, ``True`` always,
            ``False`` never.

    Ctrl-C stops the load between two tensors (``KeyboardInterrupt``), freeing what it read.

    Returns:
        The :class:`Model`.

    Raises:
        ModelIOError: the directory or a file in it is missing or unreadable.
        FormatError: a file is malformed (ConfigError, MissingTensorError, ShapeError, DtypeError
            are subclasses with details).
        DtypeError: an unknown ``dtype``.
        UnsupportedError: a checkpoint feature this build does not implement (q-LoRA, another
            activation, ...).
        InvalidArgumentError: a bad ``threads`` or ``max_seq``.
        ImportError: the native extension is not built.
    """
    dtype = _check_dtype(dtype)
    n_threads = _check_threads(threads)
    max_seq = _check_max_seq(max_seq)
    model_dir = resolve_model_dir(path)
    tokenizer = Tokenizer.from_dir(model_dir)
    generation_config = _read_generation_config(model_dir)
    if progress is not None and not isinstance(progress, bool):
        raise InvalidArgumentError(f"progress must be None, True or False, got {progress!r}")
    native = _load_native()
    bar = None if progress is False else _LoadBar(progress, f"loading {model_dir.name}")
    try:
        engine = native.Engine(str(model_dir), dtype=dtype, threads=n_threads, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return Model(
        engine,
        tokenizer,
        path=model_dir,
        generation_config=generation_config,
        max_seq=max_seq,
    )


# --------------------------------------------------------------------------------------------
# Shared generation plumbing
# --------------------------------------------------------------------------------------------


def _as_messages(message_or_messages: Any) -> list[dict[str, Any]]:
    """A str is one user message, a mapping one message, a list several."""
    if isinstance(message_or_messages, str):
        return [{"role": "user", "content": message_or_messages}]
    if isinstance(message_or_messages, Mapping):
        return validate_messages([message_or_messages])
    return validate_messages(message_or_messages)


class Model:
    """A loaded model: immutable weights (shared, thread-safe) plus its tokenizer.

    Create it with :func:`sparselm.load`. :meth:`generate` and :meth:`chat` run one request on a
    fresh KV cache; :meth:`session` keeps a cache across calls (multi-turn chat, incremental
    feeding). :attr:`last_stats` describes the most recent generation.
    """

    def __init__(
        self,
        engine: NativeEngine,
        tokenizer: Tokenizer,
        *,
        path: PathLike | None = None,
        generation_config: GenerationConfig | None = None,
        max_seq: int | None = None,
    ) -> None:
        """Wrap a native engine and a tokenizer (use :func:`sparselm.load` instead)."""
        if not isinstance(tokenizer, Tokenizer):
            raise InvalidArgumentError(
                f"tokenizer must be a sparselm.Tokenizer, got {type(tokenizer).__name__}"
            )
        self._engine = engine
        self._tokenizer = tokenizer
        self._path = Path(path) if path is not None else None
        self._config = ModelConfig.from_json(engine.config_json)
        self._vocab_size = int(engine.vocab_size)
        n_ctx = int(engine.max_position_embeddings)
        max_seq = _check_max_seq(max_seq)
        if max_seq is not None and max_seq > n_ctx:
            raise InvalidArgumentError(
                f"max_seq={max_seq} exceeds the model's context of {n_ctx} positions "
                "(max_position_embeddings)"
            )
        self._context_length = max_seq if max_seq is not None else n_ctx
        where = f" in {self._path}" if self._path else ""
        if tokenizer.vocab_size > self._vocab_size:
            raise FormatError(
                f"the tokenizer{where} has {tokenizer.vocab_size} tokens but the model's "
                f"vocab_size is {self._vocab_size}"
            )
        if tokenizer.max_token_id >= self._vocab_size:
            raise FormatError(
                f"the tokenizer{where} has token id {tokenizer.max_token_id} but the model's "
                f"vocab_size is {self._vocab_size}"
            )
        self.generation_config = generation_config or GenerationConfig()
        self._last_stats: GenerationStats | None = None
        # Generations are numbered as they start; last_stats keeps the latest-started one that
        # has ended, so a stream closed late does not overwrite a newer generation's stats.
        self._run_numbers = itertools.count(1)
        self._last_stats_number = 0
        self._stats_lock = threading.Lock()

    # -- properties ---------------------------------------------------------------------------

    @property
    def config(self) -> ModelConfig:
        """The validated ``config.json`` (read-only mapping with attribute access)."""
        return self._config

    @property
    def path(self) -> Path | None:
        """The model directory."""
        return self._path

    @property
    def dtype(self) -> str:
        """The weight format in memory (``"auto"`` resolved to the file's dtype)."""
        return str(self._engine.dtype)

    @property
    def threads(self) -> int:
        """Number of worker threads of the engine."""
        return int(self._engine.threads)

    @property
    def prompt_gemm(self) -> str:
        """Arithmetic of multi-token (prompt) products.

        ``"bf16"`` (AVX512_BF16 CPUs, weights not f32; 2.5-4x faster prompts): float weights and
        activations are rounded to bfloat16 with exact products and float32 sums; q8_0/q4_0
        projections use int8 dot products on inputs quantized to Q8_0 per token, exactly as
        decoding does, except the down projection (stored transposed), which goes through
        bfloat16 for prompts of 17 tokens or more; shorter prompts take decode's sparse path
        and give decode's bits. ``"int8"`` (CPUs without AVX512_BF16 but with the 16-row int8
        kernels, e.g. AVX2-only ones): the q8_0/q4_0 projections as above, everything else in
        float32. ``"f32"``: weights widened to float32. Single-token decoding never uses bf16
        arithmetic.
        Set the environment variable ``SPARSELM_EXACT_GEMM=1`` before loading to force ``"f32"``.
        """
        return str(self._engine.prompt_gemm)

    @property
    def tokenizer(self) -> Tokenizer:
        """The checkpoint's tokenizer and chat template."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Rows of the output matrix (may exceed the tokenizer's size: padding rows)."""
        return self._vocab_size

    @property
    def context_length(self) -> int:
        """Positions of a default session: ``max_seq`` given to :func:`load`, else the model's
        ``max_position_embeddings``."""
        return self._context_length

    @property
    def num_parameters(self) -> int | None:
        """Parameter count implied by the config (tied embeddings counted once)."""
        return self._config.num_parameters()

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation (the tokenizer's eos ids, e.g. ``<|im_end|>``,
        ``<|endoftext|>``)."""
        return self._tokenizer.eos_token_ids

    @property
    def generation_config(self) -> GenerationConfig:
        """Default sampling settings (from ``generation_config.json``, else greedy). Assign a new
        :class:`GenerationConfig` to change the defaults of later calls."""
        return self._generation_config

    @generation_config.setter
    def generation_config(self, value: GenerationConfig) -> None:
        if not isinstance(value, GenerationConfig):
            raise InvalidArgumentError(
                f"generation_config must be a GenerationConfig, got {type(value).__name__}"
            )
        self._generation_config = value

    @property
    def last_stats(self) -> GenerationStats | None:
        """Statistics of the most recent generation of any session of this model (None before
        the first one): of the generations that have ended, the one that started last (a stream
        closed late does not overwrite a newer generation's). :attr:`Session.last_stats` keeps a
        session's own.

        Keys: ``prompt_tokens``, ``prompt_eval_tokens`` (not served from a cached prefix),
        ``completion_tokens``, ``prompt_seconds``, ``decode_seconds``, ``prompt_tok_s``,
        ``decode_tok_s``, ``finish_reason`` (``"stop"``, ``"length"``, ``"context"``,
        ``"stop_string"`` or ``"cancelled"``), and ``mlp_sparsity`` (mean fraction of zero ReLU²
        neurons) and ``layer_sparsity`` (per layer) when the engine reports them, and after
        decode steps ``down_bytes_skipped_per_token`` (bytes of ``W_down`` the sparse down
        projection did not read, per token) and ``weight_bytes_per_token_dense`` (every weight
        byte of the model). For a stream they are set when it ends.
        """
        return None if self._last_stats is None else dict(self._last_stats)

    def _set_last_stats(self, stats: GenerationStats, number: int) -> None:
        """Record the stats of generation ``number`` unless a later-started one has ended."""
        with self._stats_lock:
            if number > self._last_stats_number:
                self._last_stats, self._last_stats_number = stats, number

    def __repr__(self) -> str:
        n = self.num_parameters
        params = f", params={_human(n)}" if n else ""
        return (
            f"Model(path={str(self._path) if self._path else None!r}, "
            f"model_type={self._config.get('model_type')!r}{params}, dtype={self.dtype!r}, "
            f"threads={self.threads}, context_length={self._context_length})"
        )

    # -- helpers shared with Session ----------------------------------------------------------

    def _resolve_config(self, overrides: Mapping[str, Any]) -> GenerationConfig:
        return self._generation_config.replace(**overrides)

    def _prompt_ids(self, prompt: Any, *, allow_empty: bool = False) -> tuple[list[int], bool]:
        """(ids, is_text) of a prompt; validates it."""
        if isinstance(prompt, str):
            if not prompt and not allow_empty:
                raise InvalidArgumentError("prompt must not be empty")
            return (self._tokenizer.encode(prompt) if prompt else []), True
        if isinstance(prompt, (bytes, bytearray)):
            raise InvalidArgumentError("prompt must be a str or a sequence of token ids, not bytes")
        ids = as_id_list(prompt, "prompt", self._vocab_size)
        if not ids and not allow_empty:
            raise InvalidArgumentError("prompt must not be empty")
        return ids, False

    def _decode_completion(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _run(
        self,
        native: NativeSession,
        prompt_ids: list[int],
        text: bool,
        config: GenerationConfig,
        stream: bool,
        on_finish: Callable[[GenerationStats], None] | None = None,
        register: Callable[[GenerationRun], None] | None = None,
    ) -> Any:
        number = next(self._run_numbers)

        def finished(stats: GenerationStats) -> None:
            self._set_last_stats(stats, number)
            if on_finish is not None:
                on_finish(stats)

        run = GenerationRun(native, prompt_ids, config, self.stop_token_ids, finished)
        if register is not None:
            register(run)
        run.start()
        if text:
            pieces = run.texts(self._decode_completion, config.stop_strings)
            return pieces if stream else "".join(pieces)
        ids = run.ids()
        return ids if stream else list(ids)

    # -- public API ---------------------------------------------------------------------------

    @overload
    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int | None = ...,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float | None = ...,
        seed: int | None = ...,
        stop: StopArg = ...,
        stream: Literal[False] = ...,
    ) -> str: ...
    @overload
    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int | None = ...,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float | None = ...,
        seed: int | None = ...,
        stop: StopArg = ...,
        stream: Literal[True],
    ) -> Iterator[str]: ...
    @overload
    def generate(
        self,
        prompt: Sequence[int] | npt.NDArray[Any],
        *,
        max_new_tokens: int | None = ...,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float | None = ...,
        seed: int | None = ...,
        stop: None = ...,
        stream: Literal[False] = ...,
    ) -> list[int]: ...
    @overload
    def generate(
        self,
        prompt: Sequence[int] | npt.NDArray[Any],
        *,
        max_new_tokens: int | None = ...,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float | None = ...,
        seed: int | None = ...,
        stop: None = ...,
        stream: Literal[True],
    ) -> Iterator[int]: ...

    def generate(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: StopArg = None,
        stream: bool = False,
    ) -> str | Iterator[str] | list[int] | Iterator[int]:
        """Continue ``prompt`` on a fresh KV cache.

        Args:
            prompt: Text (returns text) or token ids (returns ids, no detokenization). Text is
                encoded as is: special tokens written in it (``<|im_start|>``) are parsed; no BOS
                is added. Use :meth:`chat` to apply the chat template.
            max_new_tokens: At most this many new tokens (default: the model's
                :attr:`generation_config`, else 256).
            temperature: 0 is greedy decoding; > 0 samples.
            top_k, top_p, min_p: Sampling filters (0 / 1 / 0 disable them).
            repetition_penalty: > 1 discourages tokens already in the context.
            seed: Sampler seed, for reproducible sampling.
            stop: Stop string(s) (text prompts only): the text is cut right before the earliest
                one. Generation also ends at the tokenizer's eos ids (:attr:`stop_token_ids`),
                which are never part of the output.
            stream: Return an iterator of text pieces (or ids) as they are generated. Pieces
                never split a UTF-8 character and never contain (a part of) a stop string; joined
                they equal the non-streamed result.

        ``None`` for an option means the model's default (:attr:`generation_config`). The
        completion excludes the prompt; special tokens in it are left out of the text.
        :attr:`last_stats` is set when generation ends.

        Raises:
            InvalidArgumentError: an empty prompt, an id outside [0, vocab_size), a bad option.
            ContextLengthError: the prompt does not fit in :attr:`context_length`.
        """
        return self._generate(  # type: ignore[no-any-return]
            prompt,
            {
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "min_p": min_p,
                "repetition_penalty": repetition_penalty,
                "seed": seed,
                "stop": stop,
            },
            stream,
        )

    def _generate(self, prompt: Any, options: Mapping[str, Any], stream: bool) -> Any:
        config = self._resolve_config(options)
        ids, text = self._prompt_ids(prompt)
        if not text and options.get("stop") is not None and config.stop_strings:
            raise InvalidArgumentError(
                "stop strings need a text prompt; with token ids, compare the returned ids "
                "yourself or pass the prompt as text"
            )
        if not isinstance(stream, bool):
            raise InvalidArgumentError(f"stream must be a bool, got {type(stream).__name__}")
        n = len(ids)
        if n > self._context_length:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the context holds {self._context_length} "
                "(shorten the prompt, or load the model with a larger max_seq)"
            )
        if not text:
            config = config.replace(stop=())
        # A cache just large enough for this request (+1: the last sampled token is never fed).
        budget = config.effective_max_new_tokens(n)
        native = self._engine.new_session(min(self._context_length, n + budget + 1))
        return self._run(native, ids, text, config, stream)

    @overload
    def chat(
        self,
        messages: str | Sequence[Message],
        *,
        max_new_tokens: int | None = ...,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float | None = ...,
        seed: int | None = ...,
        stop: StopArg = ...,
        stream: Literal[False] = ...,
    ) -> str: ...
    @overload
    def chat(
        self,
        messages: str | Sequence[Message],
        *,
        max_new_tokens: int | None = ...,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float | None = ...,
        seed: int | None = ...,
        stop: StopArg = ...,
        stream: Literal[True],
    ) -> Iterator[str]: ...

    def chat(
        self,
        messages: str | Sequence[Message],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: StopArg = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """Answer a conversation: render the chat template, generate the assistant's reply.

        ``messages`` is ``[{"role": ..., "content": ...}, ...]`` (a plain string is one user
        message). The options are those of :meth:`generate`. Returns the reply text (or an
        iterator of pieces with ``stream=True``). For multi-turn chat that reuses the KV cache
        between turns, use :meth:`session` and :meth:`Session.chat`.
        """
        prompt = self._tokenizer.apply_chat_template(
            _as_messages(messages), add_generation_prompt=True
        )
        return self._generate(  # type: ignore[no-any-return]
            prompt,
            {
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "min_p": min_p,
                "repetition_penalty": repetition_penalty,
                "seed": seed,
                "stop": stop,
            },
            stream,
        )

    def logits(self, ids: Prompt) -> npt.NDArray[np.float32]:
        """Next-token logits after each prompt position, on a fresh cache.

        ``ids`` is token ids (or text, encoded as in :meth:`generate`). Returns a float32 array
        of shape ``[len(ids), vocab_size]``. Ctrl-C stops a long one between layers.
        """
        prompt_ids, _ = self._prompt_ids(ids)
        if len(prompt_ids) > self._context_length:
            raise ContextLengthError(
                f"{len(prompt_ids)} tokens but the context holds {self._context_length}"
            )
        return self._engine.logits(prompt_ids)

    def session(self, max_seq: int | None = None) -> Session:
        """A :class:`Session`: a KV cache kept across calls, for multi-turn chat and incremental
        feeding. ``max_seq`` positions (default: :attr:`context_length`)."""
        n = _check_max_seq(max_seq)
        if n is not None and n > int(self._engine.max_position_embeddings):
            raise InvalidArgumentError(
                f"max_seq={n} exceeds the model's context of "
                f"{self._engine.max_position_embeddings} positions"
            )
        return Session(self, self._engine.new_session(n if n is not None else self._context_length))


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


# --------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------


class Session:
    """A conversation with its own KV cache, kept across calls.

    * :meth:`generate` continues from the cached tokens (the new prompt is appended);
    * :meth:`chat` keeps a message history, re-renders the whole conversation each turn and lets
      the engine reuse the common prefix, so earlier turns are not recomputed;
    * :meth:`feed` appends ids and returns logits, for scoring or custom decoding.

    Create it with :meth:`Model.session`. Starting a new generation while an earlier stream of
    the same session is still open abandons that stream (its next ``next()`` raises).

    A session serves one caller at a time: a call while another call on it runs (from another
    thread, or a signal handler) raises :class:`~sparselm.SessionBusyError`. Give each thread
    its own session; :meth:`copy` makes one that starts from this one's cache.
    """

    def __init__(self, model: Model, native: NativeSession) -> None:
        """Wrap a native session of ``model`` (use :meth:`Model.session` instead)."""
        self._model = model
        self._native = native
        self._history: list[dict[str, Any]] = []
        self._run: GenerationRun | None = None
        self._last_stats: GenerationStats | None = None
        self._open_turn: tuple[GenerationRun | None, list[dict[str, Any]], list[str]] | None = None

    # -- properties ---------------------------------------------------------------------------

    @property
    def model(self) -> Model:
        """The model this session runs."""
        return self._model

    @property
    def max_seq(self) -> int:
        """Positions the KV cache holds."""
        return int(self._native.max_seq)

    @property
    def n_past(self) -> int:
        """Positions currently cached."""
        return int(self._native.n_past)

    @property
    def tokens(self) -> list[int]:
        """The token ids in the cache, in order."""
        return list(self._native.tokens)

    @property
    def history(self) -> list[dict[str, Any]]:
        """The messages of :meth:`chat` so far (a copy), assistant replies included."""
        return [dict(m) for m in self._history]

    @property
    def last_stats(self) -> GenerationStats | None:
        """Statistics of this session's most recent generation (None before its first one), as
        described under :attr:`Model.last_stats`. Unlike the model's, they are not overwritten
        by generations of other sessions (other threads)."""
        return None if self._last_stats is None else dict(self._last_stats)

    def _set_own_stats(self, stats: GenerationStats) -> None:
        self._last_stats = stats

    def copy(self) -> Session:
        """An independent session holding the same cached tokens (their KV cache copied) and
        chat history, with the same ``max_seq``.

        Use it to fork a conversation, or to compute a long shared prefix (a system prompt, a
        document) once and start several conversations from it. An open stream of this session
        is not carried over: the copy continues as after a stream that was closed (a chat turn
        in progress is in its history, with the reply so far). ``copy.copy`` and
        ``copy.deepcopy`` do the same.
        """
        twin = Session(self._model, self._native.copy())
        history = self._history
        turn = self._open_turn
        if turn is not None and turn[0] is self._run:  # a chat stream is open: as if closed
            history = [*turn[1], {"role": "assistant", "content": "".join(turn[2])}]
        twin._history = _copy.deepcopy(history)
        twin._last_stats = self._last_stats
        return twin

    def __copy__(self) -> Session:
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> Session:
        return self.copy()

    def __repr__(self) -> str:
        return (
            f"Session(n_past={self.n_past}, max_seq={self.max_seq}, messages={len(self._history)})"
        )

    # -- cache control ------------------------------------------------------------------------

    def _abandon_run(self) -> None:
        if self._run is not None:
            self._run.supersede()
            self._run = None

    def _register(self, run: GenerationRun) -> None:
        self._abandon_run()
        self._run = run

    def reset(self) -> None:
        """Forget everything: the cached tokens and the chat history."""
        self._abandon_run()
        self._native.reset()
        self._history = []

    def truncate(self, n: int) -> None:
        """Forget every cached position >= ``n`` (the chat history is kept as is)."""
        if not is_int(n) or not 0 <= n <= self.n_past:
            raise InvalidArgumentError(f"n must be an int in [0, {self.n_past}], got {n!r}")
        self._abandon_run()
        self._native.truncate(int(n))

    def feed(
        self,
        ids: Prompt,
        attention: str = "auto",
        all_logits: bool = False,
    ) -> npt.NDArray[np.float32]:
        """Append ``ids`` (or text, encoded) to the cache and return logits.

        Returns the logits after the last id (``[vocab_size]``), or after every id
        (``[len(ids), vocab_size]``) with ``all_logits=True``. ``attention`` is ``"auto"`` (dense
        for several ids, absorbed for one), ``"dense"`` or ``"absorbed"``. Ctrl-C stops a long
        feed between layers (``KeyboardInterrupt``) with none of ``ids`` cached.
        """
        if attention not in ATTENTION_MODES:
            raise InvalidArgumentError(
                f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}"
            )
        if not isinstance(all_logits, bool):
            raise InvalidArgumentError("all_logits must be a bool")
        new_ids, _ = self._model._prompt_ids(ids)
        need = self.n_past + len(new_ids)
        if need > self.max_seq:
            raise ContextLengthError(
                f"{need} positions needed but the session holds {self.max_seq} "
                f"({self.n_past} cached + {len(new_ids)} new); reset() or truncate() first"
            )
        self._abandon_run()
        return self._native.feed(new_ids, attention=attention, all_logits=all_logits)

    # -- generation ---------------------------------------------------------------------------

    def _check_fits(self, n: int, what: str) -> None:
        if n > self.max_seq:
            raise ContextLengthError(
                f"{what}: {n} positions needed but the session holds {self.max_seq}; "
                "reset() the session or start a new one"
            )

    @overload
    def generate(
        self,
        prompt: str = ...,
        *,
        max_new_tokens: int | None = ...,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float | None = ...,
        seed: int | None = ...,
        stop: StopArg = ...,
        stream: Literal[False] = ...,
    ) -> str: ...
    @overload
    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int | None = ...,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float | None = ...,
        seed: int | None = ...,
        stop: StopArg = ...,
        stream: Literal[True],
    ) -> Iterator[str]: ...
    @overload
    def generate(
        self,
        prompt: Sequence[int] | npt.NDArray[Any],
        *,
        max_new_tokens: int | None = ...,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float | None = ...,
        seed: int | None = ...,
        stop: None = ...,
        stream: Literal[False] = ...,
    ) -> list[int]: ...
    @overload
    def generate(
        self,
        prompt: Sequence[int] | npt.NDArray[Any],
        *,
        max_new_tokens: int | None = ...,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float | None = ...,
        seed: int | None = ...,
        stop: None = ...,
        stream: Literal[True],
    ) -> Iterator[int]: ...

    def generate(
        self,
        prompt: Prompt = "",
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: StopArg = None,
        stream: bool = False,
    ) -> str | Iterator[str] | list[int] | Iterator[int]:
        """Append ``prompt`` to the cached tokens and continue generating.

        Same options and return types as :meth:`Model.generate`. The cached tokens (earlier
        prompts and generated tokens) are reused, not recomputed. An empty prompt continues
        from where the session stands (it must not be empty itself): after every token the
        earlier runs generated, including those of a stop string cut from the returned text
        (not an eos token, which is never returned). The last token of a run is not in
        :attr:`tokens` yet; it is computed at the start of the next run.
        """
        m = self._model
        config = m._resolve_config(
            {
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "min_p": min_p,
                "repetition_penalty": repetition_penalty,
                "seed": seed,
                "stop": stop,
            }
        )
        new_ids, text = m._prompt_ids(prompt, allow_empty=True)
        if not text and stop is not None and config.stop_strings:
            raise InvalidArgumentError("stop strings need a text prompt")
        if not isinstance(stream, bool):
            raise InvalidArgumentError(f"stream must be a bool, got {type(stream).__name__}")
        # the last token a run returned reaches the cache only when the next one is computed
        pending = self._native.pending
        ids = self.tokens + ([] if pending is None else [pending]) + new_ids
        if not ids:
            raise InvalidArgumentError("prompt must not be empty (the session has no tokens yet)")
        self._check_fits(len(ids), f"the session holds {self.n_past} tokens + {len(new_ids)} new")
        if not text:
            config = config.replace(stop=())
        return m._run(  # type: ignore[no-any-return]
            self._native,
            ids,
            text,
            config,
            stream,
            on_finish=self._set_own_stats,
            register=self._register,
        )

    @overload
    def chat(
        self,
        message_or_messages: str | Message | Sequence[Message],
        *,
        max_new_tokens: int | None = ...,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float | None = ...,
        seed: int | None = ...,
        stop: StopArg = ...,
        stream: Literal[False] = ...,
    ) -> str: ...
    @overload
    def chat(
        self,
        message_or_messages: str | Message | Sequence[Message],
        *,
        max_new_tokens: int | None = ...,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float | None = ...,
        seed: int | None = ...,
        stop: StopArg = ...,
        stream: Literal[True],
    ) -> Iterator[str]: ...

    def chat(
        self,
        message_or_messages: str | Message | Sequence[Message],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: StopArg = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """One chat turn: add the message(s) to the history and answer.

        ``message_or_messages`` is a user message (str), one message dict, or a list of them
        (e.g. a system message and the first user message). The whole history is rendered with
        the chat template; the engine reuses the cached prefix, so only the new turn is
        computed. The reply (cut before any stop string) is appended to :attr:`history` when
        generation ends (for a stream: when it is exhausted or closed). If generation fails
        (e.g. ContextLengthError), the history is left unchanged.
        """
        m = self._model
        conversation = self._history + _as_messages(message_or_messages)
        prompt = m.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
        config = m._resolve_config(
            {
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "min_p": min_p,
                "repetition_penalty": repetition_penalty,
                "seed": seed,
                "stop": stop,
            }
        )
        if not isinstance(stream, bool):
            raise InvalidArgumentError(f"stream must be a bool, got {type(stream).__name__}")
        ids = m.tokenizer.encode(prompt)
        self._check_fits(len(ids), "the conversation")
        pieces: Iterator[str] = m._run(
            self._native,
            ids,
            True,
            config,
            True,
            on_finish=self._set_own_stats,
            register=self._register,
        )
        run = self._run
        if stream:
            return self._commit_when_done(conversation, pieces, run)
        reply = "".join(pieces)
        self._history = [*conversation, {"role": "assistant", "content": reply}]
        return reply

    def _commit_when_done(
        self,
        conversation: list[dict[str, Any]],
        pieces: Iterator[str],
        run: GenerationRun | None,
    ) -> Iterator[str]:
        parts: list[str] = []
        ok = False
        # what copy() commits for its copy while this turn is open
        self._open_turn = (run, conversation, parts)
        try:
            for piece in pieces:
                parts.append(piece)
                yield piece
            ok = True
        except (GeneratorExit, KeyboardInterrupt):  # stopped early: keep what was produced
            ok = True
            raise
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
            if self._open_turn is not None and self._open_turn[2] is parts:
                self._open_turn = None
            if ok and self._run is run:  # not superseded by reset() or a later call
                reply = "".join(parts)
                self._history = [*conversation, {"role": "assistant", "content": reply}]
