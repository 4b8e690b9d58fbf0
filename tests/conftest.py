"""Shared fixtures: tiny seeded PLM checkpoints, the NumPy reference, and a transformers oracle.

Three checkpoint shapes cover the dimension relations an engine can get wrong (v != nope,
hidden != heads·v, odd vocabulary, 3 layers, two RoPE bases, a short context). They are built
once per session in a temporary directory; nothing is downloaded.

The transformers oracle is `DeepseekV2ForCausalLM` configured as PLM (docs §6); the exact
mapping is in `hf_config_from_plm` and is verified against the reference in test_reference.py.
`import torch` happens only when an HF model is first requested, so engine-only tests stay fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY_SRC = os.path.join(ROOT, "python", "sparselm")
if importlib.util.find_spec("sparselm") is None:  # not installed: use the source tree
    sys.path.insert(0, os.path.join(ROOT, "python"))


def load_pure(name: str) -> ModuleType:
    """Import sparselm.<name> (testing / reference), even when the native engine is not built.

    Both modules are numpy-only and import nothing else from the package, so when
    ``import sparselm`` fails (no compiled extension yet) they are loaded from their files.
    """
    try:
        return importlib.import_module(f"sparselm.{name}")
    except ImportError:
        pass
    modname = f"_sparselm_pure_{name}"
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, os.path.join(PY_SRC, f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    spec.loader.exec_module(module)
    return module


testing = load_pure("testing")
reference = load_pure("reference")

# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------

#: name -> config overrides. rms_norm_eps is 1e-6 everywhere (see hf_config_from_plm).
SHAPES: dict[str, dict[str, Any]] = {
    # heads·v == hidden; odd vocabulary; theta 1e5 as in PLM-1.8B
    "a": {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "kv_lora_rank": 32,
        "intermediate_size": 256,
        "vocab_size": 503,
        "num_hidden_layers": 2,
        "rope_theta": 100000.0,
        "max_position_embeddings": 256,
    },
    # v != nope, heads·v (48) != hidden (40), 3 layers, theta 1e4
    "b": {
        "hidden_size": 40,
        "num_attention_heads": 2,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 4,
        "v_head_dim": 24,
        "kv_lora_rank": 16,
        "intermediate_size": 160,
        "vocab_size": 1000,
        "num_hidden_layers": 3,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
    },
    # 8 heads, wider latent, short context (128)
    "c": {
        "hidden_size": 96,
        "num_attention_heads": 8,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "kv_lora_rank": 64,
        "intermediate_size": 384,
        "vocab_size": 2048,
        "num_hidden_layers": 2,
        "rope_theta": 100000.0,
        "max_position_embeddings": 128,
    },
}
SHAPE_NAMES = sorted(SHAPES)
SHAPE_SEEDS = {"a": 1, "b": 2, "c": 3}


@dataclass
class Checkpoint:
    """A tiny checkpoint on disk plus the float32 weights it was written from."""

    name: str
    path: str
    config: dict[str, Any]
    weights: dict[str, np.ndarray]  # float32, as written (dtype "f32")
    seed: int
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def vocab(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def max_pos(self) -> int:
        return int(self.config["max_position_embeddings"])

    def prompt(self, n: int = 20, seed: int = 0) -> list[int]:
        """Seeded random ids over the whole embedding table (padding rows included)."""
        rng = np.random.default_rng(1000 * self.seed + seed)
        return [int(t) for t in rng.integers(0, self.vocab, size=n)]

    def ref_logits(self, ids: Sequence[int]) -> np.ndarray:
        key = ("ref", tuple(ids))
        if key not in self._cache:
            self._cache[key] = reference.reference_logits(self.config, self.weights, ids)
        return self._cache[key]

    def ref_greedy(self, ids: Sequence[int], n: int, stop_ids: Sequence[int] = ()) -> list[int]:
        key = ("greedy", tuple(ids), n, tuple(stop_ids))
        if key not in self._cache:
            self._cache[key] = reference.reference_generate_greedy(
                self.config, self.weights, ids, n, stop_ids=stop_ids
            )
        return self._cache[key]

    def variant(self, tmp_root: str, label: str, **kwargs: Any) -> str:
        """The same config and weights written again (dtype=..., shards=...), cached by label."""
        key = ("variant", label)
        if key not in self._cache:
            path = os.path.join(tmp_root, f"{self.name}-{label}")
            testing.write_checkpoint(path, self.config, self.weights, **kwargs)
            self._cache[key] = path
        return self._cache[key]


def build_checkpoint(root: str, name: str, **extra: Any) -> Checkpoint:
    overrides = dict(SHAPES[name])
    overrides.update(extra)
    seed = SHAPE_SEEDS[name]
    config = testing.random_plm_config(**overrides)
    weights = testing.random_plm_weights(config, seed)
    path = testing.write_checkpoint(os.path.join(root, name), config, weights, dtype="f32")
    return Checkpoint(name=name, path=path, config=config, weights=weights, seed=seed)


@pytest.fixture
def exact_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompt products in float32 (``SPARSELM_EXACT_GEMM=1``, read when a model loads): for
    tests that compare f16/bf16/quantized engines against float arithmetic on rounded weights.
    The default bf16 prompt GEMM has its own tests and budgets (tests/test_formats.py)."""
    monkeypatch.setenv("SPARSELM_EXACT_GEMM", "1")


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("plm-ckpts"))


@pytest.fixture(scope="session")
def checkpoints(ckpt_root: str) -> dict[str, Checkpoint]:
    """All three shapes, built once per session."""
    return {name: build_checkpoint(ckpt_root, name) for name in SHAPE_NAMES}


@pytest.fixture(scope="session", params=SHAPE_NAMES)
def ckpt(request: pytest.FixtureRequest, checkpoints: dict[str, Checkpoint]) -> Checkpoint:
    """Each shape in turn (session-scoped: tests are grouped by shape)."""
    return checkpoints[request.param]


@pytest.fixture(scope="session")
def small_ckpt(checkpoints: dict[str, Checkpoint]) -> Checkpoint:
    """Shape 'a', for tests that need one model only."""
    return checkpoints["a"]


# ----------------------------------------------------------------------------------------------
# errors and measurements
# ----------------------------------------------------------------------------------------------


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max|got - want| / max|want| (the parity metric of the test plan)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


class ErrorLog:
    """Collects measured errors; printed as one JSON object at the end of the session (-s)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}

    def record(self, shape: str, what: str, value: float) -> None:
        self.rows.setdefault(shape, {})[what] = float(value)
        print(f"[parity] shape={shape} {what}={value:.3e}")


@pytest.fixture(scope="session")
def error_log() -> Any:
    log = ErrorLog()
    yield log
    if log.rows:
        print("\n[parity-json] " + json.dumps(log.rows, sort_keys=True))


# ----------------------------------------------------------------------------------------------
# transformers oracle: DeepseekV2ForCausalLM configured as PLM (docs §6)
# ----------------------------------------------------------------------------------------------


def hf_config_from_plm(config: dict[str, Any]) -> Any:
    """The DeepseekV2Config that computes PLM exactly (checked for transformers 5.24).

    * q_lora_rank=None: plain q_proj (a non-null q_lora_rank maps 1:1 as well);
    * first_k_dense_replace=num_hidden_layers: every layer uses DeepseekV2MLP (layer i is MoE iff
      i >= first_k_dense_replace); the MoE fields keep their defaults and are never instantiated;
    * hidden_act="relu" and gate_proj := up_proj: down(relu(up x) · up x) = down(relu(up x)²);
    * rope_parameters={"rope_type": "default", "rope_theta": θ} (5.x spelling; `rope_theta` as a
      top-level kwarg is the 4.x spelling); RoPE width is config.head_dim = qk_rope_head_dim;
      apply_rotary_emb rotates adjacent pairs (view_as_complex), the PLM convention;
    * tie_word_embeddings=True; eager attention; float64 parameters;
    * bos/eos/pad ids None so nothing in the model depends on token ids.
    Caveats: kv_a_layernorm / q_a_layernorm always use eps=1e-6 (not rms_norm_eps), RMSNorm
    upcasts to float32, RoPE runs in float32 and softmax in float32 - hence ~1e-7 relative.
    """
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_attention_heads"],
        kv_lora_rank=config["kv_lora_rank"],
        q_lora_rank=config.get("q_lora_rank"),
        qk_nope_head_dim=config["qk_nope_head_dim"],
        qk_rope_head_dim=config["qk_rope_head_dim"],
        v_head_dim=config["v_head_dim"],
        hidden_act="relu",
        max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=config["rms_norm_eps"],
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": float(config["rope_theta"])},
        attention_bias=False,
        first_k_dense_replace=config["num_hidden_layers"],
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def hf_model_from_weights(config: dict[str, Any], weights: dict[str, np.ndarray]) -> Any:
    """A float64 eager DeepseekV2ForCausalLM holding ``weights`` (gate_proj := up_proj)."""
    import torch
    from transformers import DeepseekV2ForCausalLM

    hf_cfg = hf_config_from_plm(config)
    model = DeepseekV2ForCausalLM._from_config(
        hf_cfg, attn_implementation="eager", dtype=torch.float64
    )
    state = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in weights.items()}
    for i in range(int(config["num_hidden_layers"])):
        state[f"model.layers.{i}.mlp.gate_proj.weight"] = state[
            f"model.layers.{i}.mlp.up_proj.weight"
        ]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "not tied"
    model.eval()
    return model


def hf_model_from_checkpoint(model_dir: str) -> Any:
    """Load a checkpoint directory (any dtype, sharded or not) into the HF oracle."""
    config, weights = reference.load_weights(model_dir)
    return hf_model_from_weights(config, weights)


def hf_logits(model: Any, ids: Sequence[int]) -> np.ndarray:
    """Full-recompute logits [len(ids), vocab] as float64."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
    return out.logits[0].to(torch.float64).numpy()


def hf_greedy(model: Any, ids: Sequence[int], n: int, stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation by transformers' own generate() (do_sample=False, its KV cache),
    exactly ``n`` tokens, then cut before the first stop id."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(ids)], dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    gen = [int(t) for t in out[0, len(ids) :]]
    for k, t in enumerate(gen):
        if t in stop_ids:
            return gen[:k]
    return gen


def hf_greedy_recompute(model: Any, ids: Sequence[int], n: int) -> list[int]:
    """Greedy continuation by an argmax loop over full HF recomputation (no cache at all)."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(np.argmax(hf_logits(model, seq)[-1])))
    return seq[len(ids) :]


@pytest.fixture(scope="session")
def hf_models() -> Callable[[Checkpoint], Any]:
    """hf_models(ckpt) -> the (cached) HF oracle of a checkpoint's float32 weights."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    # Tiny matrices: one thread is fastest, and OpenMP spinning hurts when the engine under test
    # (or a compiler) is using the other cores.
    torch.set_num_threads(1)
    cache: dict[str, Any] = {}

    def get(ck: Checkpoint) -> Any:
        if ck.path not in cache:
            cache[ck.path] = hf_model_from_weights(ck.config, ck.weights)
        return cache[ck.path]

    return get


# ----------------------------------------------------------------------------------------------
# the engine under test
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sl() -> ModuleType:
    """The sparselm package with its native engine. Fails (does not skip) when it is missing."""
    try:
        import sparselm

        importlib.import_module("sparselm._native")
    except ImportError as e:  # pragma: no cover - depends on the build
        pytest.fail(f"the sparselm engine is not importable (build it with `maturin develop`): {e}")
    if not hasattr(sparselm, "load"):
        pytest.fail("sparselm.load is missing: the public API is not in place yet")
    return sparselm


@pytest.fixture(scope="session")
def load_model(sl: ModuleType) -> Callable[..., Any]:
    """load_model(path, dtype="auto") -> sparselm.Model, cached per (path, dtype)."""
    cache: dict[tuple[str, str], Any] = {}

    def get(path: str, dtype: str = "auto") -> Any:
        key = (path, dtype)
        if key not in cache:
            cache[key] = sl.load(path, dtype=dtype)
        return cache[key]

    return get


def stop_ids_of(model_dir: str) -> tuple[int, ...]:
    """Ids of <|im_end|> and <|endoftext|> in a checkpoint's tokenizer (docs §4 stop ids)."""
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    ids = {t["content"]: int(t["id"]) for t in tok["added_tokens"]}
    return tuple(sorted(ids[s] for s in ("<|endoftext|>", "<|im_end|>") if s in ids))


def assert_greedy_match(
    got: Sequence[int], want: Sequence[int], stop_ids: Sequence[int], n: int, what: str = ""
) -> None:
    """``got`` (an engine greedy run) equals ``want`` (the oracle's ids, not cut at stop ids).

    The engine ends at a stop id without returning it, so ``got`` may be a prefix of ``want``
    followed in ``want`` by a stop id.
    """
    got = [int(t) for t in got]
    k = len(got)
    assert got == list(want[:k]), f"{what}: greedy ids differ\n got={got}\nwant={list(want)}"
    if k < n:
        assert k < len(want) and want[k] in stop_ids, (
            f"{what}: stopped after {k} of {n} tokens without a stop id (next would be "
            f"{want[k] if k < len(want) else None})"
        )
