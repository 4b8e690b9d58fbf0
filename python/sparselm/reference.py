"""A readable NumPy float64 reference forward pass of PLM (docs/plm-architecture.md §3).

What this module owns: the specification the engine is tested against. It is written from the
architecture document, one step per line, with shapes in comments, and favours clarity over
speed (it is meant for models with a few layers and a few hundred positions).

  * `reference_logits`          dense MLA over the whole prompt (decompressed keys and values);
  * `reference_logits_absorbed` the weight-absorbed formulation, decoding one token at a time
                                over a latent cache of (normalised c, rotated k_rope);
  * `reference_generate_greedy` greedy decoding on the latent cache;
  * `load_weights`              config.json + safetensors (single file or sharded; F32/F16/BF16).

What it must not do: import torch, the native extension or anything beyond numpy (the
`safetensors` package is used when installed, with a built-in reader as fallback and for BF16).

Conventions: weights use the checkpoint's names and PyTorch ``[out, in]`` layout, so a linear
layer is ``x @ W.T``. Every computation runs in float64.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Dims",
    "LatentCache",
    "decode_step_absorbed",
    "load_weights",
    "read_safetensors",
    "reference_generate_greedy",
    "reference_logits",
    "reference_logits_absorbed",
    "rms_norm",
    "rope_adjacent",
]


@dataclass(frozen=True)
class Dims:
    """The dimensions of a PLM config (HF field names in comments)."""

    vocab: int  # vocab_size
    d: int  # hidden_size
    n_layers: int  # num_hidden_layers
    n_heads: int  # num_attention_heads
    nope: int  # qk_nope_head_dim
    rope: int  # qk_rope_head_dim
    v: int  # v_head_dim
    r: int  # kv_lora_rank
    q_lora: int | None  # q_lora_rank (None: plain q_proj)
    inter: int  # intermediate_size
    eps: float  # rms_norm_eps (all RMSNorms)
    theta: float  # rope_theta

    @staticmethod
    def from_config(config: Mapping[str, Any]) -> Dims:
        q_lora = config.get("q_lora_rank")
        return Dims(
            vocab=int(config["vocab_size"]),
            d=int(config["hidden_size"]),
            n_layers=int(config["num_hidden_layers"]),
            n_heads=int(config["num_attention_heads"]),
            nope=int(config["qk_nope_head_dim"]),
            rope=int(config["qk_rope_head_dim"]),
            v=int(config["v_head_dim"]),
            r=int(config["kv_lora_rank"]),
            q_lora=None if q_lora is None else int(q_lora),
            inter=int(config["intermediate_size"]),
            eps=float(config.get("rms_norm_eps", 1e-6)),
            theta=float(config.get("rope_theta", 10000.0)),
        )

    @property
    def scale(self) -> float:
        """Softmax scale 1/sqrt(qk_nope_head_dim + qk_rope_head_dim) (no YaRN mscale)."""
        return 1.0 / float(np.sqrt(self.nope + self.rope))


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------


def rms_norm(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm(x; g) = g ⊙ x / sqrt(mean(x²) + eps), over the last axis."""
    return g * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def rope_adjacent(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate ADJACENT pairs (x[2i], x[2i+1]) by angle p · theta^(-2i/rope), i = 0..rope/2-1.

    x: [..., n, rope] where the n axis matches ``positions`` [n]. This is the checkpoint's
    convention (docs §3); the raw slice is not permuted.
    """
    rope = x.shape[-1]
    i = np.arange(rope // 2, dtype=np.float64)
    inv_freq = theta ** (-2.0 * i / rope)  # [rope/2]
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # [n, rope/2]
    cos, sin = np.cos(ang), np.sin(ang)
    x0, x1 = x[..., 0::2], x[..., 1::2]  # [..., n, rope/2] each
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def _softmax(s: np.ndarray) -> np.ndarray:
    s = s - np.max(s, axis=-1, keepdims=True)
    e = np.exp(s)
    return e / np.sum(e, axis=-1, keepdims=True)


class _Weights:
    """float64 copies of the weights, looked up by layer (converted once per call)."""

    def __init__(self, config: Mapping[str, Any], weights: Mapping[str, np.ndarray]):
        self.dims = Dims.from_config(config)
        self.tied = bool(config.get("tie_word_embeddings", True))
        self.w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.w[name]

    def layer(self, i: int, name: str) -> np.ndarray:
        return self.w[f"model.layers.{i}.{name}"]

    @property
    def embed(self) -> np.ndarray:  # [vocab, d]
        return self.w["model.embed_tokens.weight"]

    @property
    def lm_head(
        self,
    ) -> np.ndarray:  # [vocab, d]: tied output (docs §1) unless the config unties it
        return self.embed if self.tied else self.w["lm_head.weight"]


def _check_ids(dims: Dims, ids: Sequence[int]) -> np.ndarray:
    arr = np.asarray(list(ids), dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError("ids must be a flat sequence of token ids")
    if arr.size and (arr.min() < 0 or arr.max() >= dims.vocab):
        raise ValueError(f"token id out of range [0, {dims.vocab})")
    return arr


def _queries(
    W: _Weights, i: int, a: np.ndarray, positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """q_nope [n, H, nope] and RoPE'd q_rope [n, H, rope] from the normalised input a [n, d]."""
    D = W.dims
    if D.q_lora is None:
        q = a @ W.layer(i, "self_attn.q_proj.weight").T  # [n, H·(nope+rope)]
    else:  # DeepSeek-V2 style low-rank query: q_b(RMSNorm(q_a a))
        qa = a @ W.layer(i, "self_attn.q_a_proj.weight").T  # [n, q_lora]
        qa = rms_norm(qa, W.layer(i, "self_attn.q_a_layernorm.weight"), D.eps)
        q = qa @ W.layer(i, "self_attn.q_b_proj.weight").T  # [n, H·(nope+rope)]
    q = q.reshape(len(a), D.n_heads, D.nope + D.rope)  # per head: nope first, then rope
    q_nope = q[..., : D.nope]  # [n, H, nope]
    q_rope = rope_adjacent(q[..., D.nope :].transpose(1, 0, 2), positions, D.theta)  # [H, n, rope]
    return q_nope, q_rope.transpose(1, 0, 2)  # [n, H, nope], [n, H, rope]


def _latent(
    W: _Weights, i: int, a: np.ndarray, positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised latent c [n, r] and RoPE'd shared key k_rope [n, rope]."""
    D = W.dims
    kva = a @ W.layer(i, "self_attn.kv_a_proj_with_mqa.weight").T  # [n, r + rope]
    c = rms_norm(kva[:, : D.r], W.layer(i, "self_attn.kv_a_layernorm.weight"), D.eps)  # [n, r]
    k_rope = rope_adjacent(kva[:, D.r :], positions, D.theta)  # [n, rope]
    return c, k_rope


def _mlp(W: _Weights, i: int, b: np.ndarray) -> np.ndarray:
    """W_down · relu(W_up · b)² (squared ReLU, no gate)."""
    u = b @ W.layer(i, "mlp.up_proj.weight").T  # [n, inter]
    return (np.maximum(u, 0.0) ** 2) @ W.layer(i, "mlp.down_proj.weight").T  # [n, d]


# ----------------------------------------------------------------------------------------------
# dense (decompressed) attention over a whole prompt
# ----------------------------------------------------------------------------------------------


def _attention_dense(W: _Weights, i: int, a: np.ndarray, positions: np.ndarray) -> np.ndarray:
    D = W.dims
    n = len(a)
    q_nope, q_rope = _queries(W, i, a, positions)  # [n, H, nope], [n, H, rope]
    c, k_rope = _latent(W, i, a, positions)  # [n, r], [n, rope]
    kv = (c @ W.layer(i, "self_attn.kv_b_proj.weight").T).reshape(n, D.n_heads, D.nope + D.v)
    k_nope, v = kv[..., : D.nope], kv[..., D.nope :]  # [n, H, nope], [n, H, v]
    # score_h(t, u) = (q_nope_h(t)·k_nope_h(u) + q_rope_h(t)·k_rope(u)) / sqrt(nope + rope)
    s = np.einsum("thd,uhd->htu", q_nope, k_nope) + np.einsum("thd,ud->htu", q_rope, k_rope)
    s = s * D.scale  # [H, n, n]
    s = np.where(np.tril(np.ones((n, n), dtype=bool))[None], s, -np.inf)  # causal: u <= t
    p = _softmax(s)  # [H, n, n]
    o = np.einsum("htu,uhd->thd", p, v)  # [n, H, v]
    return o.reshape(n, D.n_heads * D.v) @ W.layer(i, "self_attn.o_proj.weight").T  # [n, d]


def reference_logits(
    config: Mapping[str, Any], weights: Mapping[str, np.ndarray], ids: Sequence[int]
) -> np.ndarray:
    """Logits [len(ids), vocab] (float64) of a full-prompt forward pass starting at position 0."""
    W = _Weights(config, weights)
    D = W.dims
    tok = _check_ids(D, ids)
    pos = np.arange(len(tok))
    h = W.embed[tok]  # [n, d]; no embedding scale
    for i in range(D.n_layers):
        a = rms_norm(h, W.layer(i, "input_layernorm.weight"), D.eps)
        h = h + _attention_dense(W, i, a, pos)
        b = rms_norm(h, W.layer(i, "post_attention_layernorm.weight"), D.eps)
        h = h + _mlp(W, i, b)
    return rms_norm(h, W["model.norm.weight"], D.eps) @ W.lm_head.T  # [n, vocab]


# ----------------------------------------------------------------------------------------------
# absorbed attention: one token at a time over the latent cache
# ----------------------------------------------------------------------------------------------


class LatentCache:
    """Per layer, the normalised latent c [t, r] and rotated k_rope [t, rope] of every position."""

    def __init__(self, dims: Dims):
        self.c: list[np.ndarray] = [np.zeros((0, dims.r)) for _ in range(dims.n_layers)]
        self.k_rope: list[np.ndarray] = [np.zeros((0, dims.rope)) for _ in range(dims.n_layers)]
        self.n_past = 0


def _attention_absorbed(
    W: _Weights, i: int, a: np.ndarray, pos: int, cache: LatentCache
) -> np.ndarray:
    """docs §3 'MLA decode with absorbed weights' for one token a [1, d] at position ``pos``."""
    D = W.dims
    positions = np.array([pos])
    q_nope, q_rope = _queries(W, i, a, positions)  # [1, H, nope], [1, H, rope]
    c_new, kr_new = _latent(W, i, a, positions)  # [1, r], [1, rope]
    cache.c[i] = np.concatenate([cache.c[i], c_new])  # [t, r]
    cache.k_rope[i] = np.concatenate([cache.k_rope[i], kr_new])  # [t, rope]
    kvb = W.layer(i, "self_attn.kv_b_proj.weight").reshape(D.n_heads, D.nope + D.v, D.r)
    w_uk, w_uv = kvb[:, : D.nope, :], kvb[:, D.nope :, :]  # [H, nope, r], [H, v, r]
    q_lat = np.einsum("hdr,hd->hr", w_uk, q_nope[0])  # W_UK_hᵀ q_nope_h: [H, r]
    s = (q_lat @ cache.c[i].T + q_rope[0] @ cache.k_rope[i].T) * D.scale  # [H, t]
    p = _softmax(s)  # [H, t]; every cached position is <= pos
    ctx = p @ cache.c[i]  # Σ_u P_h(u) c(u): [H, r]
    o = np.einsum("hvr,hr->hv", w_uv, ctx)  # W_UV_h ctx_h: [H, v]
    return o.reshape(1, D.n_heads * D.v) @ W.layer(i, "self_attn.o_proj.weight").T  # [1, d]


def decode_step_absorbed(W: _Weights, token: int, cache: LatentCache) -> np.ndarray:
    """Feed one token at position cache.n_past; returns its logits [vocab] and grows the cache."""
    D = W.dims
    pos = cache.n_past
    h = W.embed[[token]]  # [1, d]
    for i in range(D.n_layers):
        a = rms_norm(h, W.layer(i, "input_layernorm.weight"), D.eps)
        h = h + _attention_absorbed(W, i, a, pos, cache)
        b = rms_norm(h, W.layer(i, "post_attention_layernorm.weight"), D.eps)
        h = h + _mlp(W, i, b)
    cache.n_past += 1
    return (rms_norm(h, W["model.norm.weight"], D.eps) @ W.lm_head.T)[0]  # [vocab]


def reference_logits_absorbed(
    config: Mapping[str, Any], weights: Mapping[str, np.ndarray], ids: Sequence[int]
) -> np.ndarray:
    """Same as `reference_logits`, computed token by token with absorbed attention."""
    W = _Weights(config, weights)
    tok = _check_ids(W.dims, ids)
    cache = LatentCache(W.dims)
    out = np.zeros((len(tok), W.dims.vocab))
    for t, token in enumerate(tok):
        out[t] = decode_step_absorbed(W, int(token), cache)
    return out


def reference_generate_greedy(
    config: Mapping[str, Any],
    weights: Mapping[str, np.ndarray],
    ids: Sequence[int],
    n: int,
    *,
    stop_ids: Sequence[int] = (),
) -> list[int]:
    """Greedy continuation of ``ids``: up to ``n`` new ids (argmax; ties go to the lowest id).

    Generation ends early when a stop id is produced; the stop id is not returned.
    """
    W = _Weights(config, weights)
    tok = _check_ids(W.dims, ids)
    if len(tok) == 0:
        raise ValueError("the prompt must hold at least one token")
    cache = LatentCache(W.dims)
    logits = np.zeros(W.dims.vocab)
    for token in tok:
        logits = decode_step_absorbed(W, int(token), cache)
    out: list[int] = []
    stops = {int(s) for s in stop_ids}
    for _ in range(n):
        nxt = int(np.argmax(logits))
        if nxt in stops:
            break
        out.append(nxt)
        if len(out) == n:
            break
        logits = decode_step_absorbed(W, nxt, cache)
    return out


# ----------------------------------------------------------------------------------------------
# loading a checkpoint
# ----------------------------------------------------------------------------------------------

_RAW_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # converted below
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A tiny independent safetensors reader (all dtypes above; BF16 is returned as float32)."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    data = memoryview(blob)[8 + n :]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _RAW_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=dt).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
        out[name] = arr.copy()
    return out


def _read_file(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
    has_bf16 = any(v.get("dtype") == "BF16" for k, v in header.items() if k != "__metadata__")
    if not has_bf16:
        try:
            from safetensors.numpy import load_file
        except ImportError:
            pass
        else:
            return dict(load_file(path))
    return read_safetensors(path)  # numpy has no bfloat16: read the bits ourselves


def load_weights(model_dir: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config dict, weights) of a model directory; float weights come back as float32.

    Reads model.safetensors, or the shards listed in model.safetensors.index.json. F16 and BF16
    values are exactly representable in float32, so nothing is rounded.
    """
    model_dir = os.fspath(model_dir)
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        files = [single]
    else:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
    weights: dict[str, np.ndarray] = {}
    for path in files:
        for name, arr in _read_file(path).items():
            weights[name] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr
    return config, weights
