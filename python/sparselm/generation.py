"""Sampling settings and the decode loop around a native session.

This module owns:

* :class:`GenerationConfig`, the validated sampling settings (and how Hugging Face
  ``generation_config.json`` files map onto them);
* :class:`IncrementalDetokenizer`, which turns a stream of token ids into text pieces without ever
  emitting half of a multi-byte UTF-8 character;
* :class:`StopStringFilter`, which cuts text before the earliest stop string and holds back text
  that could still turn out to be the start of one;
* :class:`GenerationRun`, which drives one ``_native.Session`` generation
  (``start`` then ``next_token`` until ``None``) and records its statistics.

It must not import the native extension: it talks to any object with the
``_native.Session`` interface (see :class:`NativeSession`), which is what lets the pure-Python
tests use a fake session. It knows nothing of file paths or model loading.

Invariant: for the same token ids, the text pieces of a streamed generation concatenate to
exactly the text a non-streamed generation returns (the non-streamed path *is* the joined stream).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import struct
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Protocol,
)

from ._errors import InvalidArgumentError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "FINISH_REASONS",
    "GenerationConfig",
    "GenerationRun",
    "GenerationStats",
    "IncrementalDetokenizer",
    "StopStringFilter",
]

#: A stop argument: one string, several strings, or None for no stop strings.
StopArg = str | Sequence[str] | None

#: Every value ``finish_reason`` can take in :attr:`sparselm.Model.last_stats`.
FINISH_REASONS = ("stop", "length", "context", "stop_string", "cancelled")

#: Statistics of one generation (a plain dict; keys documented in :class:`GenerationRun`).
GenerationStats = dict[str, Any]


class NativeSession(Protocol):
    """The part of ``sparselm._native.Session`` the decode loop uses (see ``_native.pyi``)."""

    @property
    def n_past(self) -> int: ...
    @property
    def max_seq(self) -> int: ...
    @property
    def tokens(self) -> list[int]: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def pending(self) -> int | None: ...
    def reset(self) -> None: ...
    def truncate(self, n: int) -> None: ...
    def copy(self) -> NativeSession: ...
    def feed(
        self, ids: Sequence[int], attention: str = "auto", all_logits: bool = False
    ) -> npt.NDArray[np.float32]: ...
    def start(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_ids: Sequence[int] = (),
    ) -> None: ...
    def next_token(self) -> int | None: ...
    def stats(self) -> dict[str, Any]: ...


# --------------------------------------------------------------------------------------------
# GenerationConfig
# --------------------------------------------------------------------------------------------


def is_int(x: object) -> bool:
    """True for Python and NumPy integers, False for bools (True as a count is a bug)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# The largest int a count or id may be (the native layer takes 64-bit sizes).
MAX_INT = 2**63 - 1


def f32_value(x: float) -> float:
    """``x`` rounded to float32 as the native sampler sees it (inf beyond float32's range)."""
    if not math.isfinite(x) or abs(x) >= 3.4028235677973366e38:  # float32's largest, rounded
        return math.copysign(math.inf, x)
    return float(struct.unpack("f", struct.pack("f", x))[0])


def as_id_list(ids: Any, what: str = "ids", vocab_size: int | None = None) -> list[int]:
    """Validate token ids (a sequence or 1-D NumPy array of ints in [0, vocab_size)).

    Returns them as a list of Python ints; raises InvalidArgumentError naming the first bad one.
    """
    if isinstance(ids, (str, bytes, bytearray, Mapping, set, frozenset)):
        # (a mapping or set would iterate as its keys, in no meaningful order)
        raise InvalidArgumentError(f"{what} must be a sequence of ints, got {type(ids).__name__}")
    ndim = getattr(ids, "ndim", None)
    if ndim is not None and ndim != 1:
        raise InvalidArgumentError(f"{what} must be one-dimensional, got an array of ndim {ndim}")
    tolist = getattr(ids, "tolist", None)
    if callable(tolist):  # NumPy arrays
        ids = tolist()
    try:
        out = list(ids)
    except TypeError:
        raise InvalidArgumentError(
            f"{what} must be a sequence of ints, got {type(ids).__name__}"
        ) from None
    for i, x in enumerate(out):
        if not is_int(x):
            raise InvalidArgumentError(f"{what}[{i}] must be an int, got {type(x).__name__} {x!r}")
        if x < 0 or x > MAX_INT or (vocab_size is not None and x >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise InvalidArgumentError(f"{what}[{i}] = {x} is out of range: ids must be {bound}")
    return [int(x) for x in out]


def normalize_stop(stop: StopArg) -> tuple[str, ...]:
    """Return ``stop`` as a tuple of non-empty strings; raise InvalidArgumentError otherwise."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, (bytes, bytearray)) or not isinstance(stop, (list, tuple)):
        raise InvalidArgumentError(
            f"stop must be a string or a list of strings, got {type(stop).__name__}"
        )
    out = []
    for s in stop:
        if not isinstance(s, str):
            raise InvalidArgumentError(
                f"stop must be a string or a list of strings, got an element of type "
                f"{type(s).__name__}: {s!r}"
            )
        if not s:
            raise InvalidArgumentError("stop strings must not be empty")
        if s not in out:
            out.append(s)
    return tuple(out)


@dataclass(frozen=True)
class GenerationConfig:
    """Validated sampling settings of one generation.

    The defaults are greedy decoding of at most 256 new tokens. A model's own defaults come from
    its ``generation_config.json`` (see :meth:`from_hf_dict`); every keyword of
    :meth:`sparselm.Model.generate` overrides one field.

    Attributes:
        max_new_tokens: Upper bound on the number of generated tokens (>= 0).
        temperature: Softmax temperature; ``0`` means greedy (argmax) decoding.
        top_k: Keep only the ``top_k`` most likely tokens; ``0`` disables the filter. Exactly
            ``top_k`` are kept, as llama.cpp does: of tokens tied at the boundary the lower ids
            stay (transformers keeps every tied token).
        top_p: Nucleus sampling: keep the smallest set of tokens whose probability mass reaches
            ``top_p``; in (0, 1], ``1`` disables the filter.
        min_p: Drop tokens whose probability is below ``min_p`` times the most likely token's;
            in [0, 1], ``0`` disables the filter.
        repetition_penalty: CTRL-style penalty (> 0) on tokens already in the context;
            ``1`` disables it.
        seed: Seed of the sampler's random generator (``None``: a fresh random seed).
        stop: Stop strings. Generation ends as soon as one appears in the text; the returned text
            is cut right before the earliest one. A single string or a sequence of strings;
            stored as a tuple.
        max_length: Optional cap on prompt tokens plus generated tokens (the Hugging Face
            ``max_length`` semantics). ``None``: only ``max_new_tokens`` and the context apply.

    Construction validates every field and raises :class:`~sparselm.InvalidArgumentError`
    (a ``ValueError``) with a message naming the bad field.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: StopArg = ()
    max_length: int | None = None

    def __post_init__(self) -> None:
        self.validate()
        # Normalize after validation so equal configs compare (and hash) equal.
        object.__setattr__(self, "stop", normalize_stop(self.stop))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("max_new_tokens", "top_k", "seed", "max_length"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, int(value))

    # -- validation ---------------------------------------------------------------------------

    def validate(self) -> None:
        """Check every field; raise InvalidArgumentError (a ValueError) naming the first bad one."""
        mnt = self.max_new_tokens
        if not is_int(mnt):
            raise InvalidArgumentError(
                f"max_new_tokens must be an int >= 0, got {type(mnt).__name__} {mnt!r}"
            )
        if not 0 <= mnt <= MAX_INT:
            raise InvalidArgumentError(f"max_new_tokens must be in [0, 2**63), got {mnt}")
        t = self.temperature
        if not _is_real(t) or math.isnan(t):
            raise InvalidArgumentError(f"temperature must be a number >= 0, got {t!r}")
        if t < 0 or math.isinf(t):
            raise InvalidArgumentError(
                f"temperature must be finite and >= 0 (0 means greedy), got {t!r}"
            )
        k = self.top_k
        if not is_int(k) or not 0 <= k <= MAX_INT:
            raise InvalidArgumentError(
                f"top_k must be an int in [0, 2**63) (0 disables it), got {k!r}"
            )
        p = self.top_p
        if not _is_real(p) or math.isnan(p) or not 0.0 < p <= 1.0:
            raise InvalidArgumentError(f"top_p must be in (0, 1] (1 disables it), got {p!r}")
        if f32_value(p) == 0.0:
            raise InvalidArgumentError(
                f"top_p = {p!r} is 0 in float32, the sampler's precision: use at least 1e-38"
            )
        mp = self.min_p
        if not _is_real(mp) or math.isnan(mp) or not 0.0 <= mp <= 1.0:
            raise InvalidArgumentError(f"min_p must be in [0, 1] (0 disables it), got {mp!r}")
        rp = self.repetition_penalty
        if not _is_real(rp) or math.isnan(rp) or rp <= 0 or math.isinf(rp32 := f32_value(rp)):
            raise InvalidArgumentError(
                "repetition_penalty must be a number > 0 within float32's range "
                f"(1 disables it), got {rp!r}"
            )
        if rp32 == 0.0:
            raise InvalidArgumentError(
                f"repetition_penalty = {rp!r} is 0 in float32, the sampler's precision"
            )
        seed = self.seed
        if seed is not None:
            if not is_int(seed):
                raise InvalidArgumentError(
                    f"seed must be an int or None, got {type(seed).__name__} {seed!r}"
                )
            if not 0 <= seed < 2**64:
                raise InvalidArgumentError(f"seed must be in [0, 2**64), got {seed}")
        normalize_stop(self.stop)
        ml = self.max_length
        if ml is not None and (not is_int(ml) or not 1 <= ml <= MAX_INT):
            raise InvalidArgumentError(
                f"max_length must be an int in [1, 2**63) or None, got {ml!r}"
            )

    # -- derived ------------------------------------------------------------------------------

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax (``temperature == 0``)."""
        return self.temperature == 0.0

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings as a tuple (possibly empty)."""
        return normalize_stop(self.stop)

    def replace(self, **overrides: Any) -> GenerationConfig:
        """A validated copy with the given fields replaced; ``None`` values are ignored.

        Passing ``max_new_tokens`` explicitly also clears ``max_length``, as in transformers
        (an explicit ``max_new_tokens`` takes precedence).
        """
        changes = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidArgumentError(
                f"unknown generation option(s): {', '.join(sorted(unknown))}"
            )
        if "max_new_tokens" in changes and "max_length" not in changes:
            changes["max_length"] = None
        return dataclasses.replace(self, **changes) if changes else self

    def effective_max_new_tokens(self, prompt_len: int) -> int:
        """``max_new_tokens`` further limited by ``max_length`` for a prompt of this length."""
        if self.max_length is None:
            return self.max_new_tokens
        return max(0, min(self.max_new_tokens, self.max_length - prompt_len))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (stop as a list)."""
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop_strings)
        return d

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> GenerationConfig:
        """Map a Hugging Face ``generation_config.json`` object onto a GenerationConfig.

        Follows transformers' semantics: ``do_sample`` false (or absent) means greedy whatever
        the temperature; when sampling, an absent ``temperature``/``top_k``/``top_p`` takes
        transformers' default (1.0 / 50 / 1.0). In greedy mode the filters the file states
        (``top_k``, ``top_p``, ``min_p``) are kept all the same, so that a call that turns
        sampling on with a ``temperature`` samples with the model's own filters, as
        transformers does for ``generate(do_sample=True, temperature=...)``; absent ones stay
        off. ``repetition_penalty``, ``max_new_tokens``, ``max_length`` and ``stop_strings``
        apply in both modes. Token ids (``eos_token_id``...) are not sampling settings: see
        :func:`eos_ids_from_hf_dict`. Unknown keys are ignored.
        """

        def get(key: str, default: Any) -> Any:
            v = d.get(key)
            return default if v is None else v

        kwargs: dict[str, Any] = {}
        do_sample = d.get("do_sample", False)
        if do_sample is not None and not isinstance(do_sample, bool):
            # (a string such as "false" is truthy: it must not turn sampling on)
            raise InvalidArgumentError(
                f"do_sample must be true or false, got {type(do_sample).__name__} {do_sample!r}"
            )
        if do_sample:
            kwargs["temperature"] = get("temperature", 1.0)
            kwargs["top_k"] = get("top_k", 50)
        else:
            # greedy: temperature stays 0; the stated filters wait for a call that samples
            kwargs["top_k"] = get("top_k", 0)
        kwargs["top_p"] = get("top_p", 1.0)
        kwargs["min_p"] = get("min_p", 0.0)
        kwargs["repetition_penalty"] = get("repetition_penalty", 1.0)
        if d.get("max_new_tokens") is not None:
            kwargs["max_new_tokens"] = d["max_new_tokens"]
        elif d.get("max_length") is not None:
            kwargs["max_length"] = d["max_length"]
        if d.get("stop_strings"):
            kwargs["stop"] = d["stop_strings"]
        return cls(**kwargs)


def eos_ids_from_hf_dict(d: Mapping[str, Any]) -> tuple[int, ...]:
    """The ``eos_token_id`` of a config dict (an int, a list of ints, or absent) as a tuple."""
    v = d.get("eos_token_id")
    if v is None:
        return ()
    ids = [v] if is_int(v) else v
    if not isinstance(ids, (list, tuple)) or not all(is_int(x) for x in ids):
        raise InvalidArgumentError(f"eos_token_id must be an int or a list of ints, got {v!r}")
    bad = [x for x in ids if not 0 <= x < 2**32]
    if bad:
        raise InvalidArgumentError(f"eos_token_id {bad[0]} is not a token id (0 <= id < 2**32)")
    return tuple(int(x) for x in ids)


# --------------------------------------------------------------------------------------------
# Text streaming helpers
# --------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turn token ids into text pieces, one ``push`` per id, never splitting a character.

    Byte-level BPE tokens may each hold part of a multi-byte UTF-8 character; decoding such a
    prefix yields U+FFFD at its end. We decode a short window of ids (the ids since the last
    clean boundary plus the new ones) and emit only the text past the already-emitted part, and
    only when it does not end with U+FFFD. :meth:`flush` emits whatever is left at the end (a
    truly invalid tail then appears as U+FFFD, exactly as a one-shot decode shows it).

    This is the offset scheme of text-generation-inference; for decoders whose output is the
    concatenation of per-token pieces (byte-level BPE, as Qwen2/PLM use) the concatenated pieces
    equal ``decode(all_ids)``.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        # The decode window: the ids since the last clean boundary, then the ones not emitted
        # yet. Ids that decode to nothing (special tokens the decoder skips) are left out of it,
        # so a long run of them costs one short decode each, not a growing one.
        self._window: list[int] = []
        self._read = 0  # ids of the window before this were emitted

    @property
    def ids(self) -> list[int]:
        """Every id pushed so far."""
        return self._ids

    def push(self, token_id: int) -> str:
        """Add one id; return the newly complete text (possibly empty)."""
        self._ids.append(token_id)
        self._window.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return any text still held back (e.g. an incomplete character at the very end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read >= len(self._window):
            return ""
        prefix_text = self._decode(self._window[: self._read])
        new_text = self._decode(self._window)
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            del self._window[: self._read]
            self._read = len(self._window)
            return new_text[len(prefix_text) :]
        if new_text == prefix_text:
            # The unemitted ids add nothing (a part of a character shows as U+FFFD, so these
            # are ids the decoder drops): keeping them would only lengthen every later decode.
            del self._window[self._read :]
        elif final:
            self._read = len(self._window)
        return ""


class StopStringFilter:
    """Cut a text stream right before the earliest stop string.

    :meth:`push` returns the text that is safe to emit: text that is not (and cannot become) part
    of a stop string. Text that could be the start of a stop string is held back until the next
    piece decides it. Once a stop string has appeared, :attr:`stopped` is true and every later
    ``push`` returns ``""``. :meth:`flush` releases the held-back text when the stream ends
    without a stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False
        #: The stop string that ended the stream, if any.
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Add a piece of text; return the part that can be emitted now."""
        if self.stopped or not text:
            return ""
        if not self._stops:
            return text
        buf = self._pending + text
        # Earliest occurrence over all stop strings (ties: the longest string, deterministic).
        best: tuple[int, str] | None = None
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
                best = (i, s)
        if best is not None:
            self.stopped = True
            self.matched = best[1]
            self._pending = ""
            return buf[: best[0]]
        hold = self._held_suffix_len(buf)
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """Release the held-back text (call when the stream ends without a stop string)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _held_suffix_len(self, buf: str) -> int:
        # Longest suffix of buf that is a proper prefix of some stop string.
        for k in range(min(len(buf), self._max_hold), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0


# --------------------------------------------------------------------------------------------
# One generation on a native session
# --------------------------------------------------------------------------------------------


class GenerationRun:
    """Drive one generation on a native session and record its statistics.

    ``start()`` is eager (the caller invokes it before handing out an iterator) so argument and
    context errors surface at the call site, not at the first ``next()``. Iterate :meth:`ids` for
    token ids or :meth:`texts` for UTF-8-safe, stop-string-aware text pieces. When the iteration
    ends (exhausted, stopped by a stop string, or closed early) ``on_finish`` receives the stats:

    * ``prompt_tokens``: ids in the prompt passed to ``start``;
    * ``prompt_eval_tokens``: ids actually run through the model (the rest was a reused cache
      prefix);
    * ``completion_tokens``: ids returned by ``next_token`` (including any generated past a stop
      string's cut);
    * ``prompt_seconds``, ``decode_seconds``, ``prompt_tok_s``, ``decode_tok_s``;
    * ``finish_reason``: ``"stop"`` (a stop id), ``"length"`` (max_new_tokens), ``"context"``
      (the cache is full), ``"stop_string"``, or ``"cancelled"`` (the caller stopped iterating);
    * ``mlp_sparsity`` (mean fraction of zero ReLU² neurons) and ``layer_sparsity`` (one value
      per layer) when the native stats provide them;
    * ``down_bytes_skipped_per_token`` (bytes of W_down not read per generated token because
      their neuron was zero; with the planar int8 layout of Q8_0/Q4_0 on AVX-512 VNNI CPUs a
      group of 32 rows with many active neurons is read whole, so fewer than the zero count
      suggests) and ``weight_bytes_per_token_dense`` (bytes a dense pass would read).
    """

    def __init__(
        self,
        session: NativeSession,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        stop_ids: Sequence[int],
        on_finish: Callable[[GenerationStats], None] | None = None,
    ) -> None:
        self._session = session
        self._prompt_ids = list(prompt_ids)
        self._config = config
        self._max_new = config.effective_max_new_tokens(len(self._prompt_ids))
        self._stop_ids = tuple(sorted({int(i) for i in stop_ids}))
        self._on_finish = on_finish
        self._started = False
        self._finished = False
        self._superseded = False
        self._stopped_by_string = False
        self._completion: list[int] = []
        self._cached_prefix = 0
        self._t_prompt = 0.0
        self._t_decode = 0.0
        #: The stats once the run has finished, else None.
        self.stats: GenerationStats | None = None

    @property
    def max_new_tokens(self) -> int:
        """The token budget of this run (max_new_tokens limited by max_length)."""
        return self._max_new

    def start(self) -> None:
        """Feed the prompt (reusing the cached prefix) and prepare sampling."""
        cached = _common_prefix_len(self._session.tokens, self._prompt_ids)
        c = self._config
        t0 = time.perf_counter()
        self._session.start(
            self._prompt_ids,
            self._max_new,
            temperature=c.temperature,
            top_k=c.top_k,
            top_p=c.top_p,
            min_p=c.min_p,
            repetition_penalty=c.repetition_penalty,
            seed=c.seed,
            stop_ids=self._stop_ids,
        )
        self._t_prompt = time.perf_counter() - t0
        self._cached_prefix = cached
        self._started = True

    def supersede(self) -> None:
        """Mark this run dead: its session has been given to a newer generation."""
        self._superseded = True

    def ids(self) -> Generator[int, None, None]:
        """Yield generated token ids until the session reports the end."""
        if not self._started:
            raise RuntimeError("GenerationRun.start() must be called before iterating")
        try:
            while True:
                if self._superseded:
                    raise RuntimeError(
                        "this generation stream was abandoned: a later call on the same "
                        "Session reused its KV cache"
                    )
                t0 = time.perf_counter()
                tok = self._session.next_token()
                self._t_decode += time.perf_counter() - t0
                if tok is None:
                    return
                self._completion.append(tok)
                yield tok
        finally:
            self._finish()

    def texts(
        self, decode: Callable[[list[int]], str], stops: Sequence[str]
    ) -> Generator[str, None, None]:
        """Yield text pieces; end right before the earliest stop string."""
        detok = IncrementalDetokenizer(decode)
        stopper = StopStringFilter(stops)
        ids = self.ids()
        try:
            for tok in ids:
                piece = stopper.push(detok.push(tok))
                if piece:
                    yield piece
                if stopper.stopped:
                    self._stopped_by_string = True
                    return
            piece = stopper.push(detok.flush())
            if stopper.stopped:
                self._stopped_by_string = True
            piece += stopper.flush()
            if piece:
                yield piece
        finally:
            ids.close()
            self._finish()

    # -- stats --------------------------------------------------------------------------------

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.stats = self._build_stats()
        # A superseded run ends late (when its abandoned iterator is closed or collected): its
        # stats must not overwrite those of the generation that replaced it.
        if self._on_finish is not None and not self._superseded:
            self._on_finish(self.stats)

    def _finish_reason(self) -> str:
        if self._stopped_by_string:
            return "stop_string"
        native = None if self._superseded else self._session.finish_reason
        if native is None:
            return "cancelled"
        if native == "context" and len(self._completion) >= self._max_new:
            return "length"
        return str(native)

    def _build_stats(self) -> GenerationStats:
        reason = self._finish_reason()
        native: dict[str, Any] = {}
        if not self._superseded:
            try:
                native = dict(self._session.stats())
            except Exception:  # noqa: BLE001 - stats are best effort, never fatal
                native = {}
        n_prompt = len(self._prompt_ids)
        prompt_eval = int(native.get("prompt_tokens", n_prompt - self._cached_prefix))
        prompt_s = float(native.get("prompt_seconds", self._t_prompt))
        decode_n = int(native.get("decode_tokens", len(self._completion)))
        decode_s = float(native.get("decode_seconds", self._t_decode))
        stats: GenerationStats = {
            "prompt_tokens": n_prompt,
            "prompt_eval_tokens": prompt_eval,
            "completion_tokens": len(self._completion),
            "prompt_seconds": prompt_s,
            "decode_seconds": decode_s,
            "prompt_tok_s": prompt_eval / prompt_s if prompt_s > 0 else 0.0,
            "decode_tok_s": decode_n / decode_s if decode_s > 0 else 0.0,
            "finish_reason": reason,
        }
        if native.get("mlp_sparsity") is not None:
            stats["mlp_sparsity"] = float(native["mlp_sparsity"])
        layers = native.get("layer_sparsity")
        if layers is not None:
            stats["layer_sparsity"] = [float(x) for x in layers]
        for key in ("down_bytes_skipped_per_token", "weight_bytes_per_token_dense"):
            if native.get(key) is not None:
                stats[key] = float(native[key])
        return stats


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
