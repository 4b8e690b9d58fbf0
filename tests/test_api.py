"""Pure-Python tests of the public layer: load(), Model, Session, Tokenizer, GenerationConfig, CLI.

None of these needs the native extension: a fake engine/session implements the
``_native.Engine``/``_native.Session`` contract of ``python/sparselm/_native.pyi`` (scripted token
ids instead of a forward pass), and the tokenizer is a small byte-level BPE trained here with the
``tokenizers`` package. What is checked is the Python side's own job: validation and its messages,
defaults, chat templating, stop ids and stop strings, UTF-8-safe streaming (streamed pieces join
to exactly the non-streamed text), statistics, KV-cache reuse across chat turns, and the CLI.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("sparselm") is None:  # not installed: use the source tree
    sys.path.insert(0, str(ROOT / "python"))

import sparselm
from sparselm import (
    ContextLengthError,
    DtypeError,
    FormatError,
    GenerationConfig,
    InvalidArgumentError,
    Model,
    ModelIOError,
    SparselmError,
    Tokenizer,
)
from sparselm import cli as cli_mod
from sparselm import model as model_mod
from sparselm.generation import (
    IncrementalDetokenizer,
    StopStringFilter,
    eos_ids_from_hf_dict,
)
from sparselm.testing import PLM_1_8B_CONFIG

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = [
    "Hello world. The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small model that ran on a CPU.",
    "user assistant system: how are you? I am fine, thank you.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and more words: stop, halt, end.",
] * 5

#: Text with multi-byte characters that the tiny BPE splits across byte tokens.
UNICODE_TEXT = "naïve café 🙂 — 日本語 ok"

PLM_1_8B = PLM_1_8B_CONFIG


# ----------------------------------------------------------------------------------------------
# A tokenizer directory and a fake native engine
# ----------------------------------------------------------------------------------------------


def _train_tokenizer_json() -> str:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return str(tok.to_str())


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return _train_tokenizer_json()


def write_model_dir(
    path: Path,
    tokenizer_json: str,
    *,
    chat_template: Any = CHATML,
    tokenizer_config: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    cfg: dict[str, Any] = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    cfg.update(tokenizer_config or {})
    (path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (path / "config.json").write_text(json.dumps(config or {"model_type": "plm"}))
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_json: str) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("model"), tokenizer_json)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


class FakeSession:
    """Implements the _native.Session contract; "samples" ids from the engine's script."""

    def __init__(self, engine: FakeEngine, max_seq: int) -> None:
        self.engine = engine
        self._max_seq = max_seq
        self._tokens: list[int] = []
        self._finish: str | None = None
        self._pending: int | None = None
        self._script: Iterator[int] = iter(())
        self._left = 0
        self._stop: set[int] = set()
        self._fed = 0
        self._decoded = 0
        self.starts: list[dict[str, Any]] = []

    # properties of the contract
    @property
    def n_past(self) -> int:
        return len(self._tokens)

    @property
    def max_seq(self) -> int:
        return self._max_seq

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    @property
    def finish_reason(self) -> str | None:
        return self._finish

    @property
    def pending(self) -> int | None:
        return self._pending

    def reset(self) -> None:
        self._tokens = []
        self._finish = None
        self._pending = None

    def truncate(self, n: int) -> None:
        del self._tokens[n:]
        self._pending = None

    def copy(self) -> FakeSession:
        # as the engine: same cached ids and pending id, no generation in progress
        twin = FakeSession(self.engine, self._max_seq)
        twin._tokens = list(self._tokens)
        twin._pending = self._pending
        twin._finish = self._finish
        return twin

    def feed(
        self, ids: Sequence[int], attention: str = "auto", all_logits: bool = False
    ) -> np.ndarray:
        if len(self._tokens) + len(ids) > self._max_seq:
            raise ContextLengthError("fake: does not fit")
        self._pending = None
        self._tokens.extend(ids)
        out = np.zeros((len(ids), self.engine.vocab_size), np.float32)
        return out if all_logits else out[-1]

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
    ) -> None:
        prompt = list(prompt_ids)
        if len(prompt) > self._max_seq:
            raise ContextLengthError(f"{len(prompt)} positions needed but the context holds ...")
        common = 0
        while (
            common < min(len(prompt), len(self._tokens)) and prompt[common] == self._tokens[common]
        ):
            common += 1
        self.starts.append(
            {
                "prompt": prompt,
                "reused": common,
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "min_p": min_p,
                "repetition_penalty": repetition_penalty,
                "seed": seed,
                "stop_ids": list(stop_ids),
            }
        )
        self._tokens = list(prompt)
        self._fed = len(prompt) - common
        self._decoded = 0
        self._script = iter(self.engine.script(prompt))
        self._left = max_new_tokens
        self._stop = set(stop_ids)
        self._finish = None
        self._pending = None

    def next_token(self) -> int | None:
        # as the engine: the last returned id is fed when the next one is asked for, so a run
        # that ends by its length or the context leaves it pending
        if self._finish is not None:
            return None
        if self._left <= 0:
            self._finish = "length"
            return None
        if self._pending is not None:
            if len(self._tokens) >= self._max_seq:
                self._finish = "context"
                return None
            self._tokens.append(self._pending)
            self._pending = None
        tok = next(self._script, None)
        self._decoded += 1
        if tok is None or tok in self._stop:
            self._finish = "stop"
            return None
        self._left -= 1
        self._pending = tok
        return tok

    def stats(self) -> dict[str, float]:
        return {
            "prompt_tokens": float(self._fed),
            "prompt_seconds": 0.5,
            "decode_tokens": float(self._decoded),
            "decode_seconds": 0.25,
            "mlp_sparsity": 0.875,
        }


class FakeEngine:
    """Implements the _native.Engine contract; generation follows ``script(prompt)``."""

    def __init__(
        self,
        script: Callable[[list[int]], Sequence[int]],
        *,
        vocab_size: int = 400,
        n_ctx: int = 128,
        config: dict[str, Any] | None = None,
        dtype: str = "f32",
        threads: int = 2,
    ) -> None:
        self.script = script
        self._vocab = vocab_size
        self._n_ctx = n_ctx
        self._config = dict(config or {"model_type": "plm", "vocab_size": vocab_size})
        self._dtype = dtype
        self._threads = threads
        self.sessions: list[FakeSession] = []
        self.init_args: tuple[Any, ...] | None = None
        self.progress: Callable[[int, int], object] | None = None

    @property
    def config_json(self) -> str:
        return json.dumps(self._config)

    @property
    def prompt_gemm(self) -> str:
        return "f32"

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def max_position_embeddings(self) -> int:
        return self._n_ctx

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        out = np.zeros((len(ids), self._vocab), np.float32)
        out[np.arange(len(ids)), list(ids)] = 1.0
        return out

    def new_session(self, max_seq: int = 0) -> FakeSession:
        s = FakeSession(self, max_seq or self._n_ctx)
        self.sessions.append(s)
        return s


def scripted(tok: Tokenizer, text: str, eos: bool = True) -> Callable[[list[int]], list[int]]:
    """A script that answers every prompt with ``text`` (then <|im_end|> when eos)."""
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end is not None
    ids = tok.encode(text) + ([im_end] if eos else [])
    return lambda prompt: list(ids)


def make_model(
    tok: Tokenizer,
    text: str = "Hello world.",
    *,
    eos: bool = True,
    generation_config: GenerationConfig | None = None,
    max_seq: int | None = None,
    **engine_kw: Any,
) -> tuple[Model, FakeEngine]:
    engine = FakeEngine(scripted(tok, text, eos), **engine_kw)
    return (
        Model(
            engine, tok, path="/fake/model", generation_config=generation_config, max_seq=max_seq
        ),
        engine,
    )


# ----------------------------------------------------------------------------------------------
# GenerationConfig
# ----------------------------------------------------------------------------------------------


def test_generation_config_defaults_are_greedy() -> None:
    c = GenerationConfig()
    assert c.max_new_tokens == 256
    assert c.temperature == 0.0 and c.greedy
    assert (c.top_k, c.top_p, c.min_p, c.repetition_penalty, c.seed) == (0, 1.0, 0.0, 1.0, None)
    assert c.stop == () and c.stop_strings == ()


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_new_tokens", -1),
        ("max_new_tokens", 1.5),
        ("max_new_tokens", True),
        ("max_new_tokens", "3"),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "1"),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", float("nan")),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("nan")),
        ("seed", 1.5),
        ("seed", -1),
        ("seed", True),
        ("seed", "42"),
        ("stop", 5),
        ("stop", [1]),
        ("stop", [""]),
        ("stop", ""),
        ("stop", b"x"),
        ("max_length", 0),
    ],
)
def test_generation_config_rejects(field: str, value: Any) -> None:
    with pytest.raises(InvalidArgumentError) as ei:
        GenerationConfig(**{field: value})
    assert field.split("_")[0] in str(ei.value) or "stop" in str(ei.value)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, SparselmError)


def test_generation_config_accepts_edges_and_numpy() -> None:
    c = GenerationConfig(
        max_new_tokens=np.int64(0),  # type: ignore[arg-type]
        temperature=np.float32(0.5),  # type: ignore[arg-type]
        top_k=np.int32(3),  # type: ignore[arg-type]
        top_p=1.0,
        min_p=1.0,
        seed=2**64 - 1,
    )
    assert c.max_new_tokens == 0 and type(c.max_new_tokens) is int
    assert type(c.temperature) is float and c.top_k == 3 and c.seed == 2**64 - 1


def test_generation_config_stop_normalized_frozen_hashable() -> None:
    assert GenerationConfig(stop="x").stop == ("x",)
    c = GenerationConfig(stop=["a", "b", "a"])
    assert c.stop == ("a", "b")
    assert hash(c) == hash(GenerationConfig(stop=("a", "b")))
    with pytest.raises(AttributeError):
        c.temperature = 1.0  # type: ignore[misc]


def test_generation_config_replace() -> None:
    c = GenerationConfig(temperature=0.7, max_length=20)
    assert c.replace(temperature=None, top_k=None) is c
    assert c.replace(top_k=5).top_k == 5 and c.replace(top_k=5).max_length == 20
    d = c.replace(max_new_tokens=8)
    assert d.max_new_tokens == 8 and d.max_length is None  # explicit max_new_tokens wins
    with pytest.raises(InvalidArgumentError, match="temperature"):
        c.replace(temperature=-1)
    with pytest.raises(InvalidArgumentError, match="unknown"):
        c.replace(temprature=1.0)
    assert c.effective_max_new_tokens(15) == 5 and c.effective_max_new_tokens(30) == 0


def test_generation_config_from_hf_dict() -> None:
    assert GenerationConfig.from_hf_dict({}) == GenerationConfig()
    greedy = GenerationConfig.from_hf_dict({"do_sample": False, "temperature": 0.7, "top_p": 0.8})
    # greedy, but the stated filter is kept for a call that samples (absent ones stay off)
    assert greedy.greedy and (greedy.top_k, greedy.top_p, greedy.min_p) == (0, 0.8, 0.0)
    assert greedy.replace(temperature=0.7).top_p == 0.8
    g2 = GenerationConfig.from_hf_dict({"top_k": 20, "min_p": 0.05})
    assert g2.greedy and (g2.top_k, g2.top_p, g2.min_p) == (20, 1.0, 0.05)
    with pytest.raises(InvalidArgumentError, match="top_p"):
        GenerationConfig.from_hf_dict({"do_sample": False, "top_p": 0})
    s = GenerationConfig.from_hf_dict(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.1}
    )
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (0.7, 50, 0.8, 1.1)
    assert GenerationConfig.from_hf_dict({"do_sample": True, "top_k": None}).top_k == 50
    assert GenerationConfig.from_hf_dict({"max_new_tokens": 12}).max_new_tokens == 12
    ml = GenerationConfig.from_hf_dict({"max_length": 20})
    assert ml.max_length == 20 and ml.effective_max_new_tokens(15) == 5
    assert GenerationConfig.from_hf_dict({"stop_strings": ["###"]}).stop == ("###",)


def test_eos_ids_from_hf_dict() -> None:
    assert eos_ids_from_hf_dict({}) == ()
    assert eos_ids_from_hf_dict({"eos_token_id": 7}) == (7,)
    assert eos_ids_from_hf_dict({"eos_token_id": [7, 9]}) == (7, 9)
    with pytest.raises(InvalidArgumentError):
        eos_ids_from_hf_dict({"eos_token_id": "7"})


# ----------------------------------------------------------------------------------------------
# Streaming helpers
# ----------------------------------------------------------------------------------------------


def test_unicode_text_splits_characters_across_tokens(tok: Tokenizer) -> None:
    # Precondition of the UTF-8 tests: some single token decodes to a broken character.
    ids = tok.encode(UNICODE_TEXT)
    assert tok.decode(ids) == UNICODE_TEXT
    assert any("\ufffd" in tok.decode([i]) for i in ids)


def test_incremental_detokenizer_never_emits_broken_characters(tok: Tokenizer) -> None:
    ids = tok.encode(UNICODE_TEXT)
    detok = IncrementalDetokenizer(tok.decode)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == UNICODE_TEXT
    assert detok.ids == ids


def test_incremental_detokenizer_flushes_an_invalid_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ab 🙂")
    cut = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tok.decode)
    pieces = [detok.push(i) for i in ids[:cut]]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + detok.flush() == tok.decode(ids[:cut])  # same as a one-shot decode


def test_incremental_detokenizer_is_linear_in_a_run_of_skipped_ids() -> None:
    # id 0 decodes to nothing (a special token the decoder skips), others to one letter each.
    decoded = []

    def decode(ids: list[int]) -> str:
        decoded.append(len(ids))
        return "".join(chr(96 + i) for i in ids if i)

    detok = IncrementalDetokenizer(decode)
    ids = [1] + [0] * 3000 + [2, 0, 0, 3]
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == "abc" == decode(ids)
    assert detok.ids == ids
    # two decodes per push of at most a few ids each (before: a window growing to 3000 ids)
    assert max(decoded[:-1]) <= 3 and sum(decoded[:-1]) <= 4 * len(ids)


def _random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 6))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize(
    "text,stops,expected,matched",
    [
        ("Hello world. STOP here", ["STOP"], "Hello world. ", "STOP"),
        ("abcabd", ["abd"], "abc", "abd"),
        ("one\n\ntwo", ["\n\n", "two"], "one", "\n\n"),
        ("xyz end abc", ["abc", "end"], "xyz ", "end"),  # earliest, not first listed
        ("no stop here", ["STOP"], "no stop here", None),
        ("ends with ST", ["STOP"], "ends with ST", None),  # held back, then flushed
        ("aaab", ["aab"], "a", "aab"),
    ],
)
def test_stop_string_filter(
    text: str, stops: list[str], expected: str, matched: str | None
) -> None:
    rng = random.Random(1234)
    for _ in range(200):
        f = StopStringFilter(stops)
        out = []
        for chunk in _random_chunks(text, rng):
            piece = f.push(chunk)
            # nothing emitted may ever be part of a (possible) stop string
            out.append(piece)
        out.append(f.flush())
        assert "".join(out) == expected
        assert f.matched == matched and f.stopped == (matched is not None)


# ----------------------------------------------------------------------------------------------
# Model.generate / chat with a fake engine
# ----------------------------------------------------------------------------------------------


def test_generate_text_stops_at_eos_and_records_stats(tok: Tokenizer) -> None:
    model, engine = make_model(tok, "Hello world.")
    out = model.generate("Once upon a time")
    assert out == "Hello world."
    prompt = tok.encode("Once upon a time")
    (s,) = engine.sessions
    start = s.starts[0]
    assert start["prompt"] == prompt
    assert start["temperature"] == 0.0 and start["max_new_tokens"] == 256
    assert set(start["stop_ids"]) == set(tok.eos_token_ids)
    stats = model.last_stats
    assert stats is not None
    assert stats["finish_reason"] == "stop"
    assert stats["prompt_tokens"] == len(prompt)
    assert stats["completion_tokens"] == len(tok.encode("Hello world."))
    assert stats["prompt_tok_s"] == pytest.approx(len(prompt) / 0.5)
    assert stats["decode_tok_s"] == pytest.approx((stats["completion_tokens"] + 1) / 0.25)
    assert stats["mlp_sparsity"] == 0.875


def test_generate_uses_a_fresh_right_sized_session_per_call(tok: Tokenizer) -> None:
    model, engine = make_model(tok, "Hi", n_ctx=100)
    model.generate("abc", max_new_tokens=5)
    model.generate("abc", max_new_tokens=500)
    n = len(tok.encode("abc"))
    assert [s.max_seq for s in engine.sessions] == [n + 5 + 1, 100]


def test_generate_forwards_sampling_options(tok: Tokenizer) -> None:
    model, engine = make_model(tok)
    model.generate(
        "x",
        max_new_tokens=7,
        temperature=0.8,
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.2,
        seed=123,
    )
    st = engine.sessions[0].starts[0]
    assert (st["max_new_tokens"], st["temperature"], st["top_k"], st["top_p"]) == (7, 0.8, 40, 0.9)
    assert (st["min_p"], st["repetition_penalty"], st["seed"]) == (0.05, 1.2, 123)


def test_generate_defaults_come_from_generation_config(tok: Tokenizer) -> None:
    gc = GenerationConfig(max_new_tokens=3, temperature=0.5, top_k=9)
    model, engine = make_model(tok, "one two three four five", generation_config=gc)
    model.generate("x")
    st = engine.sessions[0].starts[0]
    assert (st["max_new_tokens"], st["temperature"], st["top_k"]) == (3, 0.5, 9)
    assert model.last_stats["finish_reason"] == "length"  # type: ignore[index]
    model.generate("x", temperature=0)
    assert engine.sessions[1].starts[0]["temperature"] == 0.0
    with pytest.raises(InvalidArgumentError):
        model.generation_config = {"temperature": 1.0}  # type: ignore[assignment]


def test_generate_length_and_zero_tokens(tok: Tokenizer) -> None:
    model, _ = make_model(tok, "one two three four five six", eos=False)
    out = model.generate("x", max_new_tokens=2)
    assert model.last_stats["finish_reason"] == "length"  # type: ignore[index]
    assert model.last_stats["completion_tokens"] == 2  # type: ignore[index]
    assert out == tok.decode(tok.encode("one two three four five six")[:2])
    assert model.generate("x", max_new_tokens=0) == ""
    assert model.last_stats["completion_tokens"] == 0  # type: ignore[index]


def test_generate_context_full(tok: Tokenizer) -> None:
    model, _ = make_model(tok, "a b c d e f g h i j k l m n o p", eos=False, n_ctx=8)
    prompt = tok.encode("hello")
    assert len(prompt) < 8
    ids = model.generate(prompt)
    assert model.last_stats["finish_reason"] == "context"  # type: ignore[index]
    assert len(prompt) + len(ids) == 8 + 1  # the last sampled token never needs a position


def test_prompt_longer_than_context(tok: Tokenizer) -> None:
    model, engine = make_model(tok, n_ctx=4)
    with pytest.raises(ContextLengthError, match=r"prompt has \d+ tokens but the context holds 4"):
        model.generate("a much longer prompt than four tokens")
    assert engine.sessions == []
    with pytest.raises(ContextLengthError):
        model.logits(list(range(5)))


def test_generate_stream_equals_non_stream_with_unicode(tok: Tokenizer) -> None:
    model, _ = make_model(tok, UNICODE_TEXT)
    full = model.generate("x")
    pieces = list(model.generate("x", stream=True))
    assert full == UNICODE_TEXT
    assert "".join(pieces) == full
    assert len(pieces) > 1 and all(p and "\ufffd" not in p for p in pieces)
    assert model.last_stats["finish_reason"] == "stop"  # type: ignore[index]


@pytest.mark.parametrize(
    "text,stop,expected",
    [
        ("Hello world. STOP and more", "STOP", "Hello world. "),
        ("Hello world. STOP and more", ["zzz", "world"], "Hello "),
        ("café 🙂 then done", "🙂", "café "),
        ("a\n\nb", "\n\n", "a"),
        ("nothing to stop", ["STOP"], "nothing to stop"),
    ],
)
def test_stop_strings_cut_exactly(tok: Tokenizer, text: str, stop: Any, expected: str) -> None:
    model, _ = make_model(tok, text)
    assert model.generate("x", stop=stop) == expected
    reason = model.last_stats["finish_reason"]  # type: ignore[index]
    assert reason == ("stop" if expected == text else "stop_string")
    pieces = list(model.generate("x", stop=stop, stream=True))
    assert "".join(pieces) == expected
    assert model.last_stats["finish_reason"] == reason  # type: ignore[index]


def test_stop_string_from_generation_config(tok: Tokenizer) -> None:
    model, _ = make_model(tok, "one. two. three.", generation_config=GenerationConfig(stop="two"))
    assert model.generate("x") == "one. "
    assert model.generate("x", stop=[]) == "one. two. three."


def test_stream_cancelled(tok: Tokenizer) -> None:
    model, _ = make_model(tok, "one two three four five six seven")
    it = model.generate("x", stream=True)
    next(it)
    it.close()  # type: ignore[attr-defined]
    assert model.last_stats["finish_reason"] == "cancelled"  # type: ignore[index]


def test_generate_with_ids(tok: Tokenizer) -> None:
    model, engine = make_model(tok, "Hello world.")
    prompt = tok.encode("Once")
    out = model.generate(prompt)
    assert out == tok.encode("Hello world.")
    assert list(model.generate(np.array(prompt, dtype=np.int64), stream=True)) == out
    assert engine.sessions[0].starts[0]["prompt"] == prompt
    with pytest.raises(InvalidArgumentError, match="stop strings need a text prompt"):
        model.generate(prompt, stop="x")  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "prompt,match",
    [
        ("", "empty"),
        ([], "empty"),
        ([1, -1], r"prompt\[1\] = -1 is out of range"),
        ([1, 400], r"\[0, 400\)"),
        ([1, 2.0], "must be an int"),
        (["a"], "must be an int"),
        ([True], "must be an int"),
        (b"bytes", "bytes"),
        (np.zeros((2, 2), dtype=np.int64), "one-dimensional"),
        (3, "sequence of ints"),
    ],
)
def test_generate_rejects_bad_prompts(tok: Tokenizer, prompt: Any, match: str) -> None:
    model, engine = make_model(tok)
    with pytest.raises(InvalidArgumentError, match=match):
        model.generate(prompt)
    assert engine.sessions == []


def test_generate_rejects_bad_options_before_running(tok: Tokenizer) -> None:
    model, engine = make_model(tok)
    with pytest.raises(InvalidArgumentError, match="top_p"):
        model.generate("x", top_p=0)
    with pytest.raises(InvalidArgumentError, match="stream"):
        model.generate("x", stream="yes")  # type: ignore[call-overload]
    assert engine.sessions == []


def test_chat_renders_the_template(tok: Tokenizer) -> None:
    model, engine = make_model(tok, "I am fine.")
    messages = [{"role": "user", "content": "How are you?"}]
    assert model.chat(messages) == "I am fine."
    expected = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert engine.sessions[0].starts[0]["prompt"] == expected
    assert "".join(model.chat("How are you?", stream=True)) == "I am fine."
    assert engine.sessions[1].starts[0]["prompt"] == expected
    with pytest.raises(InvalidArgumentError, match="content"):
        model.chat([{"role": "user"}])


def test_logits(tok: Tokenizer) -> None:
    model, _ = make_model(tok)
    out = model.logits([3, 5, 7])
    assert out.shape == (3, 400) and out.dtype == np.float32
    assert model.logits("Hello").shape[0] == len(tok.encode("Hello"))
    with pytest.raises(InvalidArgumentError):
        model.logits([400])
    with pytest.raises(InvalidArgumentError):
        model.logits([])


def test_model_properties(tok: Tokenizer) -> None:
    engine = FakeEngine(scripted(tok, "x"), vocab_size=151936, n_ctx=4096, config=PLM_1_8B)
    model = Model(engine, tok, path="/models/plm", max_seq=1024)
    assert model.num_parameters == 1_825_458_176  # docs/plm-architecture.md §2
    assert model.config["hidden_size"] == 2048 and model.config.kv_lora_rank == 512
    assert model.config.q_lora_rank is None and "architectures" in model.config
    assert model.config.architectures == ("PLMForCausalLM",)
    with pytest.raises(TypeError):
        model.config["hidden_size"] = 1  # type: ignore[index]
    with pytest.raises(AttributeError):
        model.config.hidden_size = 1
    with pytest.raises(AttributeError):
        _ = model.config.no_such_field
    d = model.config.to_dict()
    d["architectures"].append("x")
    assert model.config.architectures == ("PLMForCausalLM",)
    assert (model.vocab_size, model.context_length, model.dtype, model.threads) == (
        151936,
        1024,
        "f32",
        2,
    )
    assert model.path == Path("/models/plm") and model.tokenizer is tok
    assert model.stop_token_ids == tok.eos_token_ids
    assert model.last_stats is None
    r = repr(model)
    assert "plm" in r and "1.83B" in r and "context_length=1024" in r
    with pytest.raises(InvalidArgumentError, match="max_seq"):
        Model(engine, tok, max_seq=5000)
    with pytest.raises(FormatError, match="tokenizer"):
        Model(FakeEngine(scripted(tok, "x"), vocab_size=100), tok)


# ----------------------------------------------------------------------------------------------
# Session
# ----------------------------------------------------------------------------------------------


def test_session_generate_continues_from_the_cache(tok: Tokenizer) -> None:
    model, engine = make_model(tok, "one two", n_ctx=64)
    session = model.session()
    (native,) = engine.sessions
    assert native.max_seq == 64 and session.max_seq == 64
    first = session.generate("Hello")
    assert first == "one two"
    cached = session.tokens
    assert cached == tok.encode("Hello") + tok.encode("one two")  # the eos is not fed
    second = session.generate(" more")
    start = native.starts[1]
    assert start["prompt"] == cached + tok.encode(" more")
    assert start["reused"] == len(cached)
    assert second == "one two"
    session.generate()  # an empty prompt continues
    assert native.starts[2]["reused"] == len(native.starts[2]["prompt"])
    session.reset()
    assert session.n_past == 0
    with pytest.raises(InvalidArgumentError, match="no tokens yet"):
        session.generate("")


def test_session_chat_multi_turn_reuses_prefix(tok: Tokenizer) -> None:
    model, engine = make_model(tok, "Fine.")
    session = model.session(max_seq=100)
    (native,) = engine.sessions
    assert native.max_seq == 100
    assert session.chat("Hi") == "Fine."
    assert session.history == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Fine."},
    ]
    first_prompt = native.starts[0]["prompt"]
    assert session.chat({"role": "user", "content": "And you?"}) == "Fine."
    second = native.starts[1]
    conv = [*session.history[:3]]
    assert second["prompt"] == tok.encode(tok.apply_chat_template(conv))
    assert second["prompt"][: len(first_prompt)] == first_prompt
    assert second["reused"] >= len(first_prompt)  # earlier turn not recomputed
    assert len(session.history) == 4
    h = session.history
    h.append({"role": "user", "content": "tampering"})
    assert len(session.history) == 4
    session.reset()
    assert session.history == [] and session.n_past == 0


def test_session_chat_with_system_message_and_stream(tok: Tokenizer) -> None:
    model, engine = make_model(tok, "Ahoy there.")
    session = model.session()
    msgs = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}]
    pieces = session.chat(msgs, stream=True)
    assert session.history == []  # committed when the stream ends
    assert "".join(pieces) == "Ahoy there."
    assert session.history[-1] == {"role": "assistant", "content": "Ahoy there."}
    assert session.history[0]["role"] == "system"
    text = tok.decode(engine.sessions[0].starts[0]["prompt"])
    assert "You are a helpful assistant" not in text and "pirate" in text


def test_session_chat_stop_string_and_cancel(tok: Tokenizer) -> None:
    model, _ = make_model(tok, "Sure. STOP more text")
    session = model.session()
    assert session.chat("Go", stop="STOP") == "Sure. "
    assert session.history[-1]["content"] == "Sure. "
    it = session.chat("Again", stream=True)
    first = next(it)
    it.close()  # type: ignore[attr-defined]
    assert session.history[-1] == {"role": "assistant", "content": first}
    assert model.last_stats["finish_reason"] == "cancelled"  # type: ignore[index]


def test_session_chat_context_error_keeps_history(tok: Tokenizer) -> None:
    model, _ = make_model(tok, "ok")
    first = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
    session = model.session(max_seq=len(first) + 10)
    session.chat("Hi")
    before = session.history
    with pytest.raises(ContextLengthError, match="conversation"):
        session.chat("a very long message " * 20)
    assert session.history == before


def test_session_superseded_stream(tok: Tokenizer) -> None:
    model, _ = make_model(tok, "one two three four five")
    session = model.session()
    old = session.generate("x", stream=True)
    next(old)
    assert session.generate("y") == "one two three four five"
    newest = model.last_stats
    with pytest.raises(RuntimeError, match="abandoned"):
        next(old)
    assert model.last_stats == newest  # the abandoned stream does not overwrite the stats
    old_chat = session.chat("hi", stream=True)
    next(old_chat)
    session.reset()
    with pytest.raises(RuntimeError):
        next(old_chat)
    assert session.history == []


def test_session_feed_and_truncate(tok: Tokenizer) -> None:
    model, _ = make_model(tok, n_ctx=16)
    session = model.session()
    assert session.feed([1, 2, 3]).shape == (400,)
    assert session.feed([4], attention="absorbed", all_logits=True).shape == (1, 400)
    assert session.n_past == 4 and session.tokens == [1, 2, 3, 4]
    with pytest.raises(InvalidArgumentError, match="attention"):
        session.feed([5], attention="flash")
    with pytest.raises(ContextLengthError, match="16"):
        session.feed(list(range(13)))
    with pytest.raises(InvalidArgumentError):
        session.feed([400])
    session.truncate(2)
    assert session.tokens == [1, 2]
    with pytest.raises(InvalidArgumentError):
        session.truncate(3)
    with pytest.raises(InvalidArgumentError, match="max_seq"):
        model.session(max_seq=0)
    with pytest.raises(InvalidArgumentError, match="exceeds"):
        model.session(max_seq=17)
    assert "n_past=2" in repr(session)


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ----------------------------------------------------------------------------------------------


def test_encode_parses_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # no BOS
    assert tok.token_to_id("<|nope|>") is None
    assert tok.id_to_token(tok.token_to_id("<|im_end|>")) == "<|im_end|>"  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        tok.decode([1, "2"])  # type: ignore[list-item]


def test_eos_token_ids(tok: Tokenizer, tmp_path: Path, tokenizer_json: str) -> None:
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert tok.eos_token_ids == (im_end, eot)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    d = write_model_dir(
        tmp_path,
        tokenizer_json,
        config={"model_type": "plm", "eos_token_id": 5},
        generation_config={"eos_token_id": [6, im_end]},
    )
    assert Tokenizer.from_dir(d).eos_token_ids == (im_end, eot, 5, 6)


def test_chat_template_chatml(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    sys_msgs = [{"role": "system", "content": "Be brief."}, *msgs]
    assert tok.apply_chat_template(sys_msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_chat_template_environment(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "yo"}]
    trimmed = (
        "{% for m in messages %}\n  {% if true %}\n{{ m['role'] }}: {{ m['content'] }}\n"
        "  {% endif %}\n{% endfor %}\n"
    )
    assert tok.apply_chat_template(msgs, chat_template=trimmed) == "user: héllo\nassistant: yo\n"
    assert (
        tok.apply_chat_template(msgs, chat_template="{{ messages[0] | tojson }}")
        == '{"role": "user", "content": "héllo"}'
    )
    assert tok.apply_chat_template(msgs, chat_template="[{{ eos_token }}|{{ bos_token }}]") == (
        "[<|im_end|>|]"
    )
    assert tok.apply_chat_template(
        msgs, chat_template="{{ greeting }}{{ add_generation_prompt }}", greeting="hey"
    ) == ("heyTrue")
    loop = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m.role }}{% endfor %}"
    )
    assert tok.apply_chat_template(msgs, chat_template=loop) == "user"
    assert len(tok.apply_chat_template(msgs, chat_template="{{ strftime_now('%Y') }}")) == 4


def test_chat_template_like_transformers(tok: Tokenizer) -> None:
    """``tools``/``documents`` are defined (None), ``{% generation %}`` blocks render their
    body with their whitespace control, and CRLF line ends read as newlines; the native CLI's
    renderer has a test with the same template and output (rust/cli/src/template.rs)."""
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    src = (
        "{% for m in messages %}{% if m.role == 'assistant' %}<a>\n  {%- generation -%}\n  "
        "{{ m.content }}  {%+ endgeneration %}</a>{% else %}{{ m.content }}{% endif %}"
        "{% endfor %}{% if tools is not none %}T{% endif %}{% if documents is none %}D{% endif %}"
        "{{ '{% generation %}' }}{# {% generation %} #}{% set generationx = 1 %}"
        "{% raw %}{% generation %}{% endraw %}{{ {'k': '}}'}['k'] }}"
    )
    want = "a<a>b  </a>D{% generation %}{% generation %}}}"
    assert tok.apply_chat_template(msgs, chat_template=src) == want
    assert tok.apply_chat_template(msgs, chat_template=src, tools=[{"n": 1}]).startswith(
        "a<a>b  </a>TD"
    )
    lf = "{% for m in messages %}\n[{{ m.content }}]\n{% endfor %}\n{{ 'x\ny' }}"
    for source in (lf, lf.replace("\n", "\r\n"), lf.replace("\n", "\r")):
        assert tok.apply_chat_template(msgs, chat_template=source) == "[a]\n[b]\nx\ny"
    # a Python error inside the template's expressions is a SparselmError too
    with pytest.raises(InvalidArgumentError, match="TypeError"):
        tok.apply_chat_template(msgs, chat_template="{{ tools | tojson }}{{ 1 + 'x' }}")


def test_chat_template_errors(tok: Tokenizer, tmp_path: Path, tokenizer_json: str) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    raising = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(InvalidArgumentError, match="roles must alternate"):
        tok.apply_chat_template(msgs, chat_template=raising)
    with pytest.raises(FormatError, match="not valid Jinja"):
        tok.apply_chat_template(msgs, chat_template="{% for %}")
    with pytest.raises(InvalidArgumentError):  # the sandbox forbids mutation
        tok.apply_chat_template(msgs, chat_template="{{ messages.append(1) }}")
    endless = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
    with pytest.raises(InvalidArgumentError, match="RecursionError"):  # was a raw RecursionError
        tok.apply_chat_template(msgs, chat_template=endless)
    bare = Tokenizer.from_dir(
        write_model_dir(tmp_path / "bare", tokenizer_json, chat_template=None)
    )
    with pytest.raises(InvalidArgumentError, match="no chat template"):
        bare.apply_chat_template(msgs)
    assert bare.apply_chat_template(msgs, chat_template="{{ messages[0].content }}") == "Hi"


@pytest.mark.parametrize(
    "messages,match",
    [
        ("hello", "list"),
        ([], "empty"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "x"}], "role"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": 3}], "must be a string"),
        ([{"role": "", "content": "x"}], "must not be empty"),
        ([{"role": "user", "content": "x"}, {"role": None, "content": "y"}], r"messages\[1\]"),
    ],
)
def test_chat_messages_validation(tok: Tokenizer, messages: Any, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        tok.apply_chat_template(messages)


def test_template_sources(tmp_path: Path, tokenizer_json: str) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    d = write_model_dir(tmp_path / "jinja", tokenizer_json)
    (d / "chat_template.jinja").write_text("JINJA:{{ messages[0].content }}")
    assert Tokenizer.from_dir(d).apply_chat_template(msgs) == "JINJA:Hi"
    listed = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    d2 = write_model_dir(tmp_path / "list", tokenizer_json, chat_template=listed)
    assert Tokenizer.from_dir(d2).apply_chat_template(msgs) == "D"
    for empty in ([], [{"name": "x"}]):  # was "lists several templates but no 'default'"
        d3 = write_model_dir(tmp_path / "empty", tokenizer_json, chat_template=empty)
        with pytest.raises(FormatError, match='a list without any {"name", "template"} entry'):
            Tokenizer.from_dir(d3)


def test_added_tokens_decoder(tmp_path: Path, tokenizer_json: str, tok: Tokenizer) -> None:
    n = tok.vocab_size
    ok = {str(tok.token_to_id("<|im_end|>")): {"content": "<|im_end|>", "special": True}}
    extra = {str(n): {"content": "<|extra|>", "special": True}}
    d = write_model_dir(
        tmp_path / "ok", tokenizer_json, tokenizer_config={"added_tokens_decoder": {**ok, **extra}}
    )
    t = Tokenizer.from_dir(d)
    assert t.token_to_id("<|extra|>") == n and t.vocab_size == n + 1
    assert t.encode("a<|extra|>")[-1] == n
    bad = {"3": {"content": "<|im_end|>", "special": True}}
    d2 = write_model_dir(
        tmp_path / "bad", tokenizer_json, tokenizer_config={"added_tokens_decoder": bad}
    )
    with pytest.raises(FormatError, match="added_tokens_decoder"):
        Tokenizer.from_dir(d2)
    # an empty list is an empty table, as the native CLI reads it; other non-objects are errors
    # (0 and "" were taken for empty tables)
    d4 = write_model_dir(
        tmp_path / "e", tokenizer_json, tokenizer_config={"added_tokens_decoder": []}
    )
    assert Tokenizer.from_dir(d4).vocab_size == n
    for odd in (0, "", [1]):
        d5 = write_model_dir(
            tmp_path / "odd", tokenizer_json, tokenizer_config={"added_tokens_decoder": odd}
        )
        with pytest.raises(FormatError, match="added_tokens_decoder must be an object"):
            Tokenizer.from_dir(d5)
    eos_dict = {"eos_token": {"content": "<|endoftext|>", "__type": "AddedToken"}}
    d3 = write_model_dir(tmp_path / "dict", tokenizer_json, tokenizer_config=eos_dict)
    assert Tokenizer.from_dir(d3).eos_token == "<|endoftext|>"


def test_tokenizer_files_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelIOError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FormatError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# ----------------------------------------------------------------------------------------------
# load()
# ----------------------------------------------------------------------------------------------


class FakeNative:
    """Stands in for the sparselm._native module."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.engines: list[FakeEngine] = []

    def Engine(
        self,
        model_dir: str,
        dtype: str = "auto",
        threads: int = 0,
        progress: Callable[[int, int], object] | None = None,
    ) -> FakeEngine:
        e = FakeEngine(scripted(self.tok, "Loaded."), dtype="f32" if dtype == "auto" else dtype)
        e.init_args = (model_dir, dtype, threads)
        e.progress = progress
        self.engines.append(e)
        return e

    @staticmethod
    def kernel_tier() -> str:
        return "scalar"

    @staticmethod
    def prompt_engine() -> str:
        return "none"


@pytest.fixture
def fake_native(monkeypatch: pytest.MonkeyPatch, tok: Tokenizer) -> FakeNative:
    native = FakeNative(tok)
    monkeypatch.setattr(model_mod, "_load_native", lambda: native)
    return native


def test_load_with_fake_native(
    fake_native: FakeNative, tmp_path: Path, tokenizer_json: str, tok: Tokenizer
) -> None:
    d = write_model_dir(
        tmp_path / "m",
        tokenizer_json,
        generation_config={"do_sample": True, "temperature": 0.6, "eos_token_id": 7},
    )
    model = sparselm.load(str(d), threads=3, max_seq=32)
    (engine,) = fake_native.engines
    assert engine.init_args == (str(d.resolve()), "auto", 3)
    assert model.path == d.resolve() and model.context_length == 32
    assert model.generation_config.temperature == 0.6 and model.generation_config.top_k == 50
    assert 7 in model.stop_token_ids
    assert model.generate("x") == "Loaded."
    sparselm.load(d)  # a Path works too, threads default to 0 (= one per core)
    assert fake_native.engines[-1].init_args == (str(d.resolve()), "auto", 0)
    assert sparselm.kernel_tier() == "scalar"
    # a bar by default (drawn on terminals only), no callback at all with progress=False
    assert fake_native.engines[-1].progress is not None
    sparselm.load(d, progress=False)
    assert fake_native.engines[-1].progress is None


def test_cli_quiet_loads_without_a_progress_bar(
    fake_native: FakeNative, tmp_path: Path, tokenizer_json: str, capsys: Any
) -> None:
    d = write_model_dir(tmp_path / "m", tokenizer_json)
    assert cli_mod.main(["generate", str(d), "x", "--quiet"]) == 0
    assert fake_native.engines[-1].progress is None
    assert cli_mod.main(["generate", str(d), "x"]) == 0
    assert fake_native.engines[-1].progress is not None
    capsys.readouterr()


def test_load_bundled_model(
    fake_native: FakeNative, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tokenizer_json: str
) -> None:
    missing = tmp_path / "not-here"
    monkeypatch.setattr(model_mod, "_BUNDLED_MODEL", missing)
    with pytest.raises(ModelIOError, match="bundled model is not present"):
        sparselm.load()
    d = write_model_dir(tmp_path / "bundled", tokenizer_json)
    monkeypatch.setattr(model_mod, "_BUNDLED_MODEL", d)
    assert sparselm.load().path == d
    assert sparselm.bundled_model_path() == d


def test_load_path_errors(fake_native: FakeNative, tmp_path: Path, tokenizer_json: str) -> None:
    with pytest.raises(ModelIOError, match="model directory not found: .*nope"):
        sparselm.load(tmp_path / "nope")
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(ModelIOError, match="got a file.*did you mean"):
        sparselm.load(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelIOError, match="no config.json"):
        sparselm.load(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelIOError, match="no tokenizer.json"):
        sparselm.load(empty)
    with pytest.raises(InvalidArgumentError):
        sparselm.load(3)  # type: ignore[arg-type]
    d = write_model_dir(tmp_path / "badgen", tokenizer_json)
    (d / "generation_config.json").write_text('{"do_sample": true, "temperature": -2}')
    with pytest.raises(FormatError, match="generation_config.json.*temperature"):
        sparselm.load(d)
    assert fake_native.engines == []


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"dtype": "int3"}, DtypeError),
        ({"dtype": None}, InvalidArgumentError),
        ({"threads": 0}, InvalidArgumentError),
        ({"threads": -2}, InvalidArgumentError),
        ({"threads": 1.5}, InvalidArgumentError),
        ({"threads": True}, InvalidArgumentError),
        ({"max_seq": 0}, InvalidArgumentError),
        ({"max_seq": "8"}, InvalidArgumentError),
    ],
)
def test_load_argument_errors(
    fake_native: FakeNative, model_dir: Path, kwargs: dict[str, Any], error: type
) -> None:
    with pytest.raises(error):
        sparselm.load(model_dir, **kwargs)
    assert fake_native.engines == []


@pytest.mark.parametrize("dtype", sparselm.DTYPES)
def test_load_passes_dtype_through(fake_native: FakeNative, model_dir: Path, dtype: str) -> None:
    sparselm.load(model_dir, dtype=dtype)
    assert fake_native.engines[-1].init_args[1] == dtype  # type: ignore[index]


def test_missing_native_extension_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sparselm._native", None)
    monkeypatch.delattr(sparselm, "_native", raising=False)
    with pytest.raises(ImportError, match="native extension .* could not be imported.*maturin"):
        model_mod._load_native()


# ----------------------------------------------------------------------------------------------
# Package surface
# ----------------------------------------------------------------------------------------------


def test_public_api() -> None:
    for name in sparselm.__all__:
        assert hasattr(sparselm, name), name
    for err in (
        "SparselmError",
        "ModelIOError",
        "FormatError",
        "ConfigError",
        "MissingTensorError",
        "ShapeError",
        "DtypeError",
        "UnsupportedError",
        "ContextLengthError",
        "InvalidArgumentError",
    ):
        assert err in sparselm.__all__ and issubclass(getattr(sparselm, err), SparselmError)
    assert isinstance(sparselm.__version__, str) and sparselm.__version__
    assert (ROOT / "python" / "sparselm" / "py.typed").exists()


def test_import_does_not_pull_frameworks() -> None:
    code = (
        "import sys, sparselm\n"
        "bad = [m for m in ('torch', 'transformers', 'jinja2') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "python"), env.get("PYTHONPATH", "")) if p
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == ""


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def cli_model(monkeypatch: pytest.MonkeyPatch, tok: Tokenizer) -> dict[str, Any]:
    """Make sparselm.cli.load return a fake model; records the load arguments."""
    calls: dict[str, Any] = {}

    def fake_load(path: Any = None, **kw: Any) -> Model:
        calls["path"] = path
        calls["kw"] = kw
        model, engine = make_model(tok, calls.get("reply", "Hi there!"), config=PLM_1_8B)
        if "generation_config" in calls:
            model.generation_config = calls["generation_config"]
        calls["model"], calls["engine"] = model, engine
        return model

    monkeypatch.setattr(cli_mod, "load", fake_load)
    return calls


def run_cli(
    argv: list[str], capsys: pytest.CaptureFixture[str], stdin: str | None = None
) -> tuple[int, str, str]:
    old = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = cli_mod.main(argv)
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_prompt_only(cli_model: dict[str, Any], capsys: Any) -> None:
    code, out, err = run_cli(
        ["generate", "Once upon", "--max-new-tokens", "9", "--seed", "4"], capsys
    )
    assert code == 0
    assert out == "Hi there!\n"
    assert cli_model["path"] is None  # the bundled model
    assert cli_model["kw"] == {"dtype": "auto", "threads": None, "max_seq": None, "progress": None}
    st = cli_model["engine"].sessions[0].starts[0]
    assert st["max_new_tokens"] == 9 and st["seed"] == 4
    assert st["prompt"] == cli_model["model"].tokenizer.encode("Once upon")
    assert "prompt:" in err and "tok/s" in err and "finish: stop" in err
    assert "sparsity" not in err


def test_cli_generate_model_dir_and_options(cli_model: dict[str, Any], capsys: Any) -> None:
    argv = ["generate", "/some/model", "Hello", "--dtype", "f16", "--threads", "2", "--stats"]
    argv += ["--stop", "there", "--stop", "\\n", "--temperature", "0.7", "--top-k", "5"]
    argv += ["--top-p", "0.9", "--min-p", "0.1", "--repetition-penalty", "1.1", "--max-seq", "64"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0 and out == "Hi \n"
    assert cli_model["path"] == "/some/model"
    assert cli_model["kw"] == {"dtype": "f16", "threads": 2, "max_seq": 64, "progress": None}
    st = cli_model["engine"].sessions[0].starts[0]
    assert (st["temperature"], st["top_k"], st["top_p"], st["min_p"]) == (0.7, 5, 0.9, 0.1)
    assert "mlp sparsity: 87.5%" in err and "finish: stop_string" in err


def test_cli_option_values_may_start_with_a_dash(cli_model: dict[str, Any], capsys: Any) -> None:
    """As in the native CLI, an option's value is the next argument whatever it looks like
    (argparse alone rejected ``--stop --``); after ``--`` nothing is an option."""
    cli_model["reply"] = "Hi -- there!"
    argv = ["generate", "Hi", "--stop", "--", "--system", "-be brief-", "-m", "-odd-dir", "-q"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert out == "Hi \n" and cli_model["path"] == "-odd-dir"
    tok = cli_model["model"].tokenizer
    prompt = tok.decode(cli_model["engine"].sessions[0].starts[0]["prompt"])
    assert "-be brief-" in prompt
    # the --opt=VALUE form too (argparse made "--stop=--" an empty stop string)
    code, out, err = run_cli(["generate", "Hi", "--stop=--", "--system=-x-", "-q"], capsys)
    assert code == 0 and out == "Hi \n", err
    prompt = tok.decode(cli_model["engine"].sessions[-1].starts[0]["prompt"])
    assert "-x-" in prompt
    code, out, err = run_cli(["generate", "-q", "--", "--stop"], capsys)
    assert code == 0 and out == "Hi -- there!\n"
    tok = cli_model["model"].tokenizer
    assert cli_model["engine"].sessions[0].starts[0]["prompt"] == tok.encode("--stop")


def test_cli_generate_model_option_and_chat(cli_model: dict[str, Any], capsys: Any) -> None:
    code, out, _ = run_cli(["generate", "--model", "/m", "Hi", "--chat", "-q"], capsys)
    assert code == 0 and out == "Hi there!\n" and cli_model["path"] == "/m"
    tok = cli_model["model"].tokenizer
    prompt = tok.decode(cli_model["engine"].sessions[0].starts[0]["prompt"])
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    code, _, err = run_cli(["generate", "--model", "/m", "/n", "Hi"], capsys)
    assert code == 2 and "not both" in err


def test_cli_generate_prompt_from_stdin(cli_model: dict[str, Any], capsys: Any) -> None:
    code, out, _ = run_cli(["generate", "-", "-q"], capsys, stdin="piped prompt")
    assert code == 0 and out == "Hi there!\n"
    tok = cli_model["model"].tokenizer
    assert cli_model["engine"].sessions[0].starts[0]["prompt"] == tok.encode("piped prompt")


@pytest.mark.parametrize(
    "argv,code,message",
    [
        (["generate", "a", "b", "c"], 2, "expected [MODEL_DIR] PROMPT"),
        (["generate", "hi", "--temperature", "-1"], 2, "temperature"),
        (["generate", "hi", "--top-p", "0"], 2, "top_p"),
        (["generate", "hi", "--stop", ""], 2, "stop"),
    ],
)
def test_cli_usage_errors(
    cli_model: dict[str, Any], capsys: Any, argv: list[str], code: int, message: str
) -> None:
    got, out, err = run_cli(argv, capsys)
    assert got == code and out == ""
    assert err.startswith("sparselm: error:") and message in err
    assert "Traceback" not in err


def test_cli_sparselm_error_exit_1(capsys: Any, tmp_path: Path) -> None:
    code, out, err = run_cli(["generate", str(tmp_path / "missing"), "hi"], capsys)
    assert code == 1 and out == ""
    assert err == f"sparselm: error: model directory not found: {tmp_path / 'missing'}\n"


def test_cli_keyboard_interrupt(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    def interrupted(*a: Any, **k: Any) -> Model:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod, "load", interrupted)
    code, _, err = run_cli(["generate", "hi"], capsys)
    assert code == 130 and "Traceback" not in err


def test_cli_argparse_errors_exit_2(capsys: Any) -> None:
    with pytest.raises(SystemExit) as ei:
        cli_mod.main(["generate", "hi", "--dtype", "int3"])
    assert ei.value.code == 2
    with pytest.raises(SystemExit) as ei:
        cli_mod.main([])
    assert ei.value.code == 2


def test_cli_chat_repl(cli_model: dict[str, Any], capsys: Any) -> None:
    cli_model["reply"] = "Hello!"
    stdin = "Hi\n\n/help\nHow are you?\n/reset\nAgain\n/bogus\n/exit\nnever read\n"
    code, out, err = run_cli(["chat", "/m", "--system", "Be nice.", "-q"], capsys, stdin=stdin)
    assert code == 0
    assert out == "Hello!\nHello!\nHello!\n"
    assert "[conversation reset]" in err and "unknown command /bogus" in err
    starts = cli_model["engine"].sessions[0].starts
    tok = cli_model["model"].tokenizer
    texts = [tok.decode(s["prompt"]) for s in starts]
    assert len(starts) == 3
    assert texts[0].startswith("<|im_start|>system\nBe nice.<|im_end|>")
    assert texts[1].startswith(texts[0]) and "How are you?" in texts[1]  # multi-turn
    assert texts[2].startswith("<|im_start|>system\nBe nice.") and "How are you?" not in texts[2]
    assert starts[1]["reused"] >= len(starts[0]["prompt"])


class _TtyInput(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("interactive", [True, False])
def test_cli_chat_ctrl_c_stops_the_reply_only_when_interactive(
    cli_model: dict[str, Any], capsys: Any, monkeypatch: pytest.MonkeyPatch, interactive: bool
) -> None:
    cli_model["reply"] = "Hello!"
    calls = []
    real_chat = sparselm.Session.chat

    def chat(self: sparselm.Session, *a: Any, **kw: Any) -> Any:
        calls.append(a)
        if len(calls) == 1:
            raise KeyboardInterrupt  # as during the first reply's prompt
        return real_chat(self, *a, **kw)

    monkeypatch.setattr(sparselm.Session, "chat", chat)
    lines = "Hi\nAgain\n"
    monkeypatch.setattr(sys, "stdin", _TtyInput(lines) if interactive else io.StringIO(lines))
    code = cli_mod.main(["chat", "/m", "-q"])
    out, err = capsys.readouterr()
    if interactive:
        assert code == 0 and "[reply interrupted]" in err, err
        assert out == "> \n> Hello!\n> " and len(calls) == 2  # input() prompts on stdout
    else:
        assert code == 130 and len(calls) == 1  # a piped chat ends, as generate does


@pytest.mark.parametrize(
    "exc,code",
    [
        (InvalidArgumentError("the chat template rejected the messages: no way"), 2),
        (ContextLengthError("the conversation has 99 tokens but the session holds 64"), 1),
    ],
)
def test_cli_chat_piped_error_exit_codes(
    cli_model: dict[str, Any],
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
    exc: Exception,
    code: int,
) -> None:
    # as the native CLI and `generate --chat`: a rejected argument is a usage error (2), a
    # runtime error 1 (before, both were 1)
    def refuse(*a: Any, **k: Any) -> Any:
        raise exc

    monkeypatch.setattr(model_mod.Session, "chat", refuse)
    got, out, err = run_cli(["chat", "-q"], capsys, stdin="Hi\nagain\n")
    assert got == code and out == ""
    assert err.startswith("sparselm: error: ") and str(exc) in err


def test_cli_chat_eof_exits_cleanly(cli_model: dict[str, Any], capsys: Any) -> None:
    code, out, err = run_cli(["chat"], capsys, stdin="Hi")
    assert code == 0 and out == "Hi there!\n" and "prompt:" in err


def test_cli_info(cli_model: dict[str, Any], capsys: Any) -> None:
    code, out, _ = run_cli(["info", "/m"], capsys)
    assert code == 0
    assert "1,825,458,176" in out and "hidden_size" in out and "kernel tier" in out
    code, out, _ = run_cli(["info", "--model", "/m", "--json"], capsys)
    info = json.loads(out)
    assert info["num_parameters"] == 1_825_458_176 and info["dtype"] == "f32"
    assert info["config"]["kv_lora_rank"] == 512 and info["generation_config"]["temperature"] == 0
    # the down layout applies to the quantized formats only
    assert info["down_layout"] is None and "down layout" not in run_cli(["info"], capsys)[1]


def test_cli_info_reports_the_down_layout_of_quantized_models(
    monkeypatch: pytest.MonkeyPatch, tok: Tokenizer, capsys: Any
) -> None:
    def fake_load(path: Any = None, **kw: Any) -> Model:
        return make_model(tok, config=PLM_1_8B, dtype="q4_0")[0]

    monkeypatch.setattr(cli_mod, "load", fake_load)
    code, out, _ = run_cli(["info", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["dtype"] == "q4_0"
    assert info["down_layout"] == sparselm.down_layout()
    assert f"down layout {info['down_layout']}" in " ".join(run_cli(["info"], capsys)[1].split())


def test_cli_info_generation_line(cli_model: dict[str, Any], capsys: Any) -> None:
    # max_length from generation_config.json is what limits a run (was: "max_new_tokens 256")
    cli_model["generation_config"] = GenerationConfig.from_hf_dict({"max_length": 12})
    line = next(x for x in run_cli(["info"], capsys)[1].splitlines() if x.startswith("generation"))
    assert line.split(None, 1)[1] == "greedy, max_length 12"
    cli_model["generation_config"] = GenerationConfig(temperature=0.7, top_k=5, top_p=0.9)
    line = next(x for x in run_cli(["info"], capsys)[1].splitlines() if x.startswith("generation"))
    assert line.split(None, 1)[1] == "temperature 0.7, top_k 5, top_p 0.9, max_new_tokens 256"


def test_cli_value_options_match_the_parser() -> None:
    # _VALUE_OPTIONS repeats what the parser declares (argparse's public API does not list its
    # options); this catches an option added to one and not the other
    parser = cli_mod.build_parser()
    declared: set[str] = set()
    sub_actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for sub in sub_actions[0].choices.values():
        for action in sub._actions:
            if action.option_strings and action.nargs != 0:
                declared.update(o for o in action.option_strings if o.startswith("--"))
    assert declared == set(cli_mod._VALUE_OPTIONS)
    assert set(cli_mod._TEXT_OPTIONS) <= declared


def test_python_dash_m_help() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "python"), env.get("PYTHONPATH", "")) if p
    )
    out = subprocess.run(
        [sys.executable, "-m", "sparselm", "generate", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    for opt in ("--max-new-tokens", "--temperature", "--top-k", "--top-p", "--min-p", "--stop"):
        assert opt in out.stdout


# ----------------------------------------------------------------------------------------------
# Numbers and text the native layer cannot take: typed errors, not OverflowError / TypeError
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 2**70},
        {"top_k": 2**64},
        {"max_length": 2**63},
        {"top_p": 1e-300},  # 0 in float32
        {"repetition_penalty": 3.5e38},  # inf in float32
        {"repetition_penalty": 1e-300},  # 0 in float32
    ],
)
def test_numbers_out_of_the_native_range_are_invalid_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        GenerationConfig(**kwargs)


def test_generation_config_do_sample_must_be_a_bool() -> None:
    with pytest.raises(InvalidArgumentError, match="do_sample"):
        GenerationConfig.from_hf_dict({"do_sample": "false", "temperature": 0.7})
    assert GenerationConfig.from_hf_dict({"do_sample": None, "temperature": 0.7}).greedy


def test_threads_beyond_what_the_machine_can_use_are_rejected_before_loading() -> None:
    with pytest.raises(InvalidArgumentError, match="threads"):
        sparselm.load("/nonexistent/model", threads=10**6)
    with pytest.raises(InvalidArgumentError, match="threads"):
        sparselm.load("/nonexistent/model", threads=2**70)
    assert sparselm.max_threads() >= 64


def test_lone_surrogates_and_bad_ids_in_the_tokenizer(tok: Tokenizer) -> None:
    with pytest.raises(InvalidArgumentError, match="surrogate"):
        tok.encode("abc\ud800")
    with pytest.raises(InvalidArgumentError, match="surrogate"):
        tok.apply_chat_template([{"role": "user", "content": "\udcff"}])
    with pytest.raises(InvalidArgumentError):
        tok.decode([2**40])
    with pytest.raises(InvalidArgumentError):
        tok.id_to_token(1.7)  # type: ignore[arg-type]
    assert tok.id_to_token(2**40) is None and tok.id_to_token(-1) is None


def test_mappings_and_sets_are_not_token_prompts(tok: Tokenizer) -> None:
    model, _ = make_model(tok)
    bads: list[Any] = [{1: 2}, {1, 2}]
    for bad in bads:
        with pytest.raises(InvalidArgumentError, match="sequence of ints"):
            model.generate(bad)


def test_cli_rejects_text_that_is_not_utf8(cli_model: dict[str, Any], capsys: Any) -> None:
    # Python turns undecodable argv bytes into lone surrogates (surrogateescape)
    code, _, err = run_cli(["generate", "hi \udcff"], capsys)
    assert code == 2 and "not valid Unicode" in err and "Traceback" not in err
    code, _, err = run_cli(["generate", "hi", "--max-new-tokens", str(10**23)], capsys)
    assert code == 2 and "max_new_tokens" in err


def test_write_checkpoint_checks_its_arguments_before_writing(tmp_path: Path) -> None:
    from sparselm import testing

    cases: list[dict[str, Any]] = [{"vocab_size": 100}, {"shards": 10**6}]
    for kw in cases:
        target = tmp_path / f"m{len(kw)}-{next(iter(kw.values()))}"
        with pytest.raises(ValueError):
            testing.make_tiny_checkpoint(target, **kw)
        assert not target.exists() or not any(target.iterdir()), kw
    done = Path(testing.make_tiny_checkpoint(tmp_path / "ok"))
    assert (done / "config.json").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_config_and_tokenizer_copy_and_pickle(tok: Tokenizer) -> None:
    # ModelConfig: copy/deepcopy/unpickle recursed forever in __getattr__ (a spawn Pool given a
    # config hung); Tokenizer: pickling failed once the chat template had been compiled.
    import copy
    import pickle

    from sparselm.model import ModelConfig

    c = ModelConfig(dict(PLM_1_8B_CONFIG))
    for twin in (copy.copy(c), copy.deepcopy(c), pickle.loads(pickle.dumps(c))):
        assert isinstance(twin, ModelConfig) and twin.to_dict() == c.to_dict()
        assert twin.hidden_size == c.hidden_size
    with pytest.raises(AttributeError, match="no field"):
        _ = c.not_a_field
    msgs = [{"role": "user", "content": "Hi"}]
    want = tok.apply_chat_template(msgs)  # compiles (and caches) the template
    for twin in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        assert twin.apply_chat_template(msgs) == want
        assert twin.encode("hello world") == tok.encode("hello world")
