"""Tiny, seeded PLM checkpoints for tests and benchmarks.

What this module owns:
  * a minimal safetensors *writer* (F32, F16, BF16, plus raw integer/F64 tensors so tests can
    write deliberately wrong files), and the low-level pieces (`pack_safetensors`,
    `read_safetensors_header`) that tests use to corrupt files on purpose;
  * `random_plm_config` / `random_plm_weights`: a PLM config.json dict in the Hugging Face format
    and float32 weights with the exact names and ``[out, in]`` shapes of the real checkpoint
    (docs/plm-architecture.md §1–§2);
  * `write_checkpoint` / `make_tiny_checkpoint`: a model directory (config.json, model.safetensors
    or shards + index, tokenizer.json, tokenizer_config.json) that `sparselm.load` can open;
  * `cycle_weights`: hand-built weights whose greedy continuation follows a fixed cycle of token
    ids (used to force byte tokens that split a UTF-8 character).

What it must not do: import torch or the native extension (numpy only at module level; the
`tokenizers` package is imported lazily when a tokenizer is written). It never downloads anything.

Invariants: everything is deterministic in (config, seed); files are written atomically
(temporary file + ``os.replace``), so a crashed test never leaves half a checkpoint behind.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

__all__ = [
    "CHAT_TEMPLATE",
    "SAFETENSORS_DTYPES",
    "SPECIAL_TOKENS",
    "TRAINING_TEXT",
    "bf16_bits",
    "bf16_to_f32",
    "byte_token_id",
    "bytes_to_unicode",
    "cycle_weights",
    "encode_tensor",
    "make_tiny_checkpoint",
    "pack_safetensors",
    "random_plm_config",
    "random_plm_weights",
    "read_safetensors_header",
    "round_to_dtype",
    "safetensors_bytes",
    "tensor_shapes",
    "tokenizer_json",
    "write_bytes_atomic",
    "write_checkpoint",
    "write_safetensors",
    "write_tokenizer",
]

PathLike = Union[str, "os.PathLike[str]"]

# ----------------------------------------------------------------------------------------------
# safetensors writer
# ----------------------------------------------------------------------------------------------

#: safetensors dtype name -> (numpy dtype of the stored bytes, bytes per element).
#: BF16 has no numpy dtype: its bits are stored as little-endian uint16.
SAFETENSORS_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}

_NUMPY_TO_SAFETENSORS = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int16"): "I16",
    np.dtype("int8"): "I8",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}

_DTYPE_ALIASES = {
    "f32": "F32",
    "float32": "F32",
    "f16": "F16",
    "float16": "F16",
    "bf16": "BF16",
    "bfloat16": "BF16",
    "f64": "F64",
    "float64": "F64",
    "i32": "I32",
    "int32": "I32",
}


def _st_dtype(name: str) -> str:
    """Normalise a user dtype name ('bf16', 'F16', 'float32', ...) to the safetensors spelling."""
    key = name.strip()
    if key.upper() in SAFETENSORS_DTYPES:
        return key.upper()
    if key.lower() in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[key.lower()]
    raise ValueError(
        f"unknown dtype {name!r}; expected one of f32, f16, bf16 (or a safetensors name)"
    )


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16) by round-to-nearest-even; NaN stays a quiet NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = ((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    if nan.any():
        rounded[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values a tensor has after being stored as ``dtype`` ('f32', 'f16', 'bf16')."""
    st = _st_dtype(dtype)
    x32 = np.asarray(x, dtype=np.float32)
    if st == "F32":
        return x32.copy()
    if st == "F16":
        return x32.astype(np.float16).astype(np.float32)
    if st == "BF16":
        return bf16_to_f32(bf16_bits(x32)).reshape(x32.shape)
    raise ValueError(f"round_to_dtype: {dtype!r} is not a float storage dtype")


def encode_tensor(arr: np.ndarray, dtype: str | None = None) -> tuple[str, bytes]:
    """Encode one array as (safetensors dtype name, little-endian bytes).

    dtype None keeps the array's own dtype (so an int32 or float64 array is written as I32/F64,
    which is how tests produce files with unsupported dtypes). 'f32'/'f16'/'bf16' convert from
    the array's values (bf16 by round-to-nearest-even from float32).
    """
    a = np.asarray(arr)
    if dtype is None:
        try:
            st = _NUMPY_TO_SAFETENSORS[a.dtype.newbyteorder("=")]
        except KeyError:
            raise ValueError(f"no safetensors dtype for numpy dtype {a.dtype}") from None
    else:
        st = _st_dtype(dtype)
    if st == "BF16":
        data = bf16_bits(a.astype(np.float32))
    else:
        data = a.astype(SAFETENSORS_DTYPES[st][0], copy=False)
    return st, np.ascontiguousarray(data).tobytes()


def pack_safetensors(header: Mapping[str, Any], data: bytes, *, align: int = 8) -> bytes:
    """Low level: ``u64 little-endian header length | header JSON padded with spaces | data``.

    The header is written as given (tests use this to build files with bad offsets or dtypes).
    Padding makes the data start at a multiple of ``align`` bytes, as the safetensors writer does.
    """
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    pad = (-(8 + len(text))) % align
    text += b" " * pad
    return struct.pack("<Q", len(text)) + text + bytes(data)


def safetensors_bytes(
    tensors: Mapping[str, np.ndarray],
    dtype: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """A complete safetensors file in memory. Tensors are laid out contiguously in name order."""
    header: dict[str, Any] = {
        "__metadata__": dict(metadata) if metadata is not None else {"format": "pt"}
    }
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        st, raw = encode_tensor(arr, dtype)
        header[name] = {
            "dtype": st,
            "shape": [int(d) for d in arr.shape],
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    return pack_safetensors(header, b"".join(chunks))


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory + os.replace."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 & ~umask)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_safetensors(
    path: PathLike,
    tensors: Mapping[str, np.ndarray],
    dtype: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to a safetensors file (atomically). See `encode_tensor` for ``dtype``."""
    write_bytes_atomic(path, safetensors_bytes(tensors, dtype, metadata))


def read_safetensors_header(source: PathLike | bytes) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header: returns (header dict, byte offset where the data starts)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw = bytes(source[:8])
        (n,) = struct.unpack("<Q", raw)
        text = bytes(source[8 : 8 + n])
    else:
        with open(source, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            text = f.read(n)
    return json.loads(text.decode("utf-8")), 8 + n


def _write_json(path: PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# config and weights
# ----------------------------------------------------------------------------------------------

_DEFAULT_CONFIG: dict[str, Any] = {
    # Same keys, order and value types as PLM-1.8B's config.json (docs §1), small dimensions.
    "architectures": ["PLMForCausalLM"],
    "model_type": "plm",
    "vocab_size": 503,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 32,
    "q_lora_rank": None,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "hidden_act": "relu2",
    "max_position_embeddings": 256,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pretraining_tp": 1,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "eos_token_id": None,
    "torch_dtype": "float32",
    "transformers_version": "4.51.0",
}


#: config.json of PLM-1.8B (docs/plm-architecture.md §1), for shape-exact tests and benchmarks.
PLM_1_8B_CONFIG: dict[str, Any] = {
    "architectures": ["PLMForCausalLM"],
    "model_type": "plm",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "intermediate_size": 8192,
    "hidden_act": "relu2",
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rope_theta": 100000.0,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "torch_dtype": "bfloat16",
}


def random_plm_config(**overrides: Any) -> dict[str, Any]:
    """A PLM config.json dict in the Hugging Face format with small default dimensions.

    Keyword overrides replace (or add) keys. ``num_key_value_heads`` follows
    ``num_attention_heads`` unless it is overridden explicitly.
    """
    cfg = dict(_DEFAULT_CONFIG)
    cfg["architectures"] = list(cfg["architectures"])
    cfg.update(overrides)
    if "num_key_value_heads" not in overrides:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    return cfg


def tensor_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a PLM checkpoint with its ``[out, in]`` shape (docs §2), in file order."""
    d = int(config["hidden_size"])
    n_heads = int(config["num_attention_heads"])
    nope = int(config["qk_nope_head_dim"])
    rope = int(config["qk_rope_head_dim"])
    v = int(config["v_head_dim"])
    r = int(config["kv_lora_rank"])
    inter = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    q_lora = config.get("q_lora_rank")
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        if q_lora is None:
            shapes[p + "self_attn.q_proj.weight"] = (n_heads * (nope + rope), d)
        else:
            shapes[p + "self_attn.q_a_proj.weight"] = (int(q_lora), d)
            shapes[p + "self_attn.q_a_layernorm.weight"] = (int(q_lora),)
            shapes[p + "self_attn.q_b_proj.weight"] = (n_heads * (nope + rope), int(q_lora))
        shapes[p + "self_attn.kv_a_proj_with_mqa.weight"] = (r + rope, d)
        shapes[p + "self_attn.kv_a_layernorm.weight"] = (r,)
        shapes[p + "self_attn.kv_b_proj.weight"] = (n_heads * (nope + v), r)
        shapes[p + "self_attn.o_proj.weight"] = (d, n_heads * v)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "mlp.up_proj.weight"] = (inter, d)
        shapes[p + "mlp.down_proj.weight"] = (d, inter)
    shapes["model.norm.weight"] = (d,)
    if not config.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (vocab, d)
    return shapes


def random_plm_weights(
    config: Mapping[str, Any], seed: int = 0, *, gain: float = 4.0
) -> dict[str, np.ndarray]:
    """Seeded float32 weights for ``config`` with the checkpoint's names and ``[out, in]`` shapes.

    Scaling (so activations stay O(1) and nothing saturates):
      * embeddings ~ N(0, 2/d): the tied output ``E · norm(h)`` gives logits with standard
        deviation ~1.4 (sampling at temperature 1 is neither flat nor one-hot);
      * every projection that reads a normalised vector ~ N(0, 1/in), so its outputs are ~N(0, 1);
        ``up_proj`` outputs are symmetric around 0, so ReLU² zeroes about half the neurons;
      * the two residual writers (``o_proj``, ``down_proj``) each add about ``gain`` times the
        embedding's rms. With tied embeddings the current token's own row scores
        ``|E_t|² / rms(h)``; gain 4 keeps that self-bias small enough that greedy decoding does
        not just repeat its input token forever (gain 1 does);
      * RMSNorm weights are 1 + N(0, 0.1²).
    """
    rng = np.random.default_rng(seed)
    d = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    emb_std = float(np.sqrt(2.0 / d))
    out: dict[str, np.ndarray] = {}
    for name, shape in tensor_shapes(config).items():
        if len(shape) == 1:  # an RMSNorm weight
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            w = emb_std * rng.standard_normal(shape)
        elif name.endswith("o_proj.weight"):
            w = gain * emb_std * rng.standard_normal(shape) / np.sqrt(shape[1] / 4.0)
        elif name.endswith("down_proj.weight"):
            # E[relu(z)^4] = 3/2 for z ~ N(0, 1), so the sum over inter neurons has variance
            # 1.5 · inter · std²; aim for an output rms of about gain · emb_std.
            w = gain * emb_std * rng.standard_normal(shape) / np.sqrt(1.5 * inter)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = np.asarray(w, dtype=np.float32)
    return out


def cycle_weights(
    config: Mapping[str, Any],
    cycle: Sequence[int],
    seed: int = 0,
    *,
    strength: float = 8.0,
) -> dict[str, np.ndarray]:
    """Weights whose greedy continuation after any id of ``cycle`` is the next id of ``cycle``.

    Construction (exact, no training): cycle token k gets the embedding ``c · e_k`` (a basis
    direction k < len(cycle)); every other token lives in the remaining directions. Attention
    writes nothing (``o_proj = 0``). Layer 0's MLP maps direction k to ``strength · c · e_{k+1}``:
    up-row k reads e_k (ReLU² of a positive number, exactly 0 for other tokens), down-column k
    writes e_{k+1}. The final logits are then ``E · norm(e_k + strength · e_{k+1})``, largest for
    the next cycle id, and every non-cycle token scores near 0. Other layers add nothing.

    Needs ``hidden_size > len(cycle)`` and ``intermediate_size >= len(cycle)``.
    """
    cycle = [int(t) for t in cycle]
    n = len(cycle)
    d = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    if len(set(cycle)) != n or n < 2:
        raise ValueError("cycle needs at least two distinct ids")
    if d <= n or inter < n:
        raise ValueError(
            "cycle_weights needs hidden_size > len(cycle) and intermediate_size >= len(cycle)"
        )
    w = random_plm_weights(config, seed)
    for name in w:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[name][...] = 0.0  # attention and MLPs write nothing (layer 0's MLP is set below)
        if name.endswith("norm.weight"):
            w[name][...] = 1.0  # every RMSNorm is a plain normalisation
    c = 1.0
    emb = w["model.embed_tokens.weight"]
    emb[:, :n] *= 0.05  # other tokens: small overlap with the cycle directions, so logits differ
    for k, tok in enumerate(cycle):
        emb[tok, :] = 0.0
        emb[tok, k] = c
    up = w["model.layers.0.mlp.up_proj.weight"]
    down = w["model.layers.0.mlp.down_proj.weight"]
    up[:n, :] = 0.0
    up[n:, :n] = 0.0  # the remaining neurons read only the other directions: 0 for cycle tokens
    # b = RMSNorm(c · e_k) = sqrt(d) · e_k (norm weights are 1), so up-row k gives sqrt(d) and
    # relu(.)² = d. Down-column k then writes strength · c · e_{k+1}.
    for k in range(n):
        up[k, k] = 1.0
        down[:, k] = 0.0
        down[(k + 1) % n, k] = strength * c / d
    return w


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------

#: Qwen2's special tokens (docs §4); here they take the ids right after the trained vocabulary.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

#: The Qwen2 pre-tokenizer split regex (as in Qwen2's tokenizer.json).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: ChatML, as in the PLM-1.8B-Instruct tokenizer_config.json (docs §4).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

#: Fixed English text the tiny BPE is trained on (written for this file; no external data).
TRAINING_TEXT = """\
The small model runs on the board next to the sensor, and it answers in a few hundred
milliseconds. Nobody has to send the recording to a server, and nothing leaves the room.
When the battery is low, the device sleeps; when a question arrives, it wakes, reads the
prompt, and writes the answer one token at a time.

A language model is a function from a sequence of tokens to a table of scores, one score for
every token in the vocabulary. The highest score is the most likely next token. Greedy decoding
always takes the highest score; sampling draws from the scores after they are turned into
probabilities. Temperature makes the distribution sharper or flatter. Top-k keeps only the k
best tokens, top-p keeps the smallest set whose probability reaches p, and min-p drops every
token whose probability is below a fraction of the best one.

The attention layer compares the current token with every earlier token. Each comparison is a
dot product between a query and a key, divided by the square root of their width. The softmax
turns the scores into weights that sum to one, and the output is the weighted sum of the values.
Multi-head latent attention stores a short latent vector for every token instead of the full
keys and values, so the cache is about nine times smaller. The keys and values are rebuilt from
the latent vector when they are needed, or the rebuilding matrices are folded into the query and
the output.

The feed-forward layer multiplies the hidden state by a wide matrix, squares the positive part,
and multiplies by a second matrix. Most of the squared values are exactly zero, and a zero
neuron needs no work in the second matrix. That is where the speed comes from: the engine reads
only the rows it needs. On a phone, a tablet, or a Raspberry Pi, memory bandwidth is the limit,
so every byte that is not read is time saved.

Questions and answers. What is the capital of France? Paris is the capital of France. How many
days are there in a week? There are seven days in a week. What is two plus three? Two plus
three is five. Which is larger, 17 or 71? The number 71 is larger than 17. Where does the sun
rise? The sun rises in the east and sets in the west. What do plants need to grow? Plants need
light, water, air and soil. Can you write a short poem about the sea?

The sea is grey in the morning light,
the gulls are loud, the wind is bright;
the boats go out, the boats come in,
and the tide forgets where it has been.

Numbers and dates: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 2025 3.14 2.718 1/2 50% $12.99
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. January, February, March,
April, May, June, July, August, September, October, November, December.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))

The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. A stitch in
time saves nine. Every good boy does fine. All that glitters is not gold. Actions speak louder
than words. Better late than never. Practice makes perfect. Knowledge is power. Time is money.
The early bird catches the worm, but the second mouse gets the cheese. It was a bright cold day
in April, and the clocks were striking thirteen. Call me by my name; I will answer you.
"""


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by the ByteLevel pre-tokenizer."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@functools.cache
def tokenizer_json(n_regular: int) -> str:
    """A byte-level BPE tokenizer.json with at most ``n_regular`` ordinary tokens + 3 specials.

    Trained on `TRAINING_TEXT` with the `tokenizers` package (deterministic; a few ms) and
    cached per size. Layout mirrors Qwen2: the 256 byte tokens and merges first, then
    ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` as special added tokens. NFC normalizer,
    Qwen2 regex split + ByteLevel pre-tokenizer, ByteLevel decoder, no BOS/EOS post-processing.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    if n_regular < 256:
        raise ValueError(f"a byte-level BPE needs at least 256 regular tokens, got {n_regular}")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    trainer = trainers.BpeTrainer(
        vocab_size=n_regular,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    data = json.loads(tok.to_str(pretty=False))
    # Qwen2's decoder entry (the Python constructor does not take these keywords; decoding is
    # the same either way).
    data["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def byte_token_id(tokenizer_json_text: str, byte: int) -> int:
    """The id of the single-byte token for ``byte`` (0..255) in a byte-level tokenizer.json."""
    vocab = json.loads(tokenizer_json_text)["model"]["vocab"]
    return int(vocab[bytes_to_unicode()[byte]])


def _tokenizer_config() -> dict[str, Any]:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {},
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _check_tokenizer_vocab(vocab_size: int) -> None:
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size {vocab_size} is too small for a byte-level tokenizer "
            f"(>= {256 + len(SPECIAL_TOKENS)})"
        )


def write_tokenizer(model_dir: PathLike, vocab_size: int) -> str:
    """Write tokenizer.json + tokenizer_config.json sized for a model with ``vocab_size`` rows.

    Up to 8 of the highest embedding rows are left as padding (never produced by the tokenizer),
    as in PLM-1.8B where rows 151,646.. are padding. Returns the tokenizer.json text.
    """
    _check_tokenizer_vocab(vocab_size)
    n_regular = max(min(vocab_size - len(SPECIAL_TOKENS) - 8, 2000), 256)
    text = tokenizer_json(n_regular)
    tok = json.loads(text)
    n_total = len(tok["model"]["vocab"]) + len(tok["added_tokens"])
    assert n_total <= vocab_size, (n_total, vocab_size)
    cfg = _tokenizer_config()
    for t in tok["added_tokens"]:
        cfg["added_tokens_decoder"][str(t["id"])] = {
            "content": t["content"],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    model_dir = os.fspath(model_dir)
    write_bytes_atomic(os.path.join(model_dir, "tokenizer.json"), text.encode("utf-8"))
    _write_json(os.path.join(model_dir, "tokenizer_config.json"), cfg)
    return text


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------

_TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def write_checkpoint(
    path: PathLike,
    config: Mapping[str, Any],
    weights: Mapping[str, np.ndarray],
    *,
    dtype: str = "f32",
    shards: int = 1,
    tokenizer: bool = True,
) -> str:
    """Write a Hugging Face style model directory and return its path.

    Files: config.json; model.safetensors, or ``shards`` files ``model-0000k-of-0000n.safetensors``
    plus model.safetensors.index.json (``{"metadata": {"total_size"}, "weight_map"}``); and, when
    ``tokenizer`` is true, tokenizer.json + tokenizer_config.json. ``dtype`` is the stored dtype
    of every tensor ('f32', 'f16' or 'bf16'); config.json's torch_dtype says the same.

    Arguments are checked before anything is written, every file is written atomically, and
    config.json comes last: a directory left by a failure part-way never looks like a model.
    """
    st = _st_dtype(dtype)
    if st not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"write_checkpoint stores f32, f16 or bf16, not {dtype!r}")
    names = sorted(weights)
    if shards > 1 and shards > len(names):
        raise ValueError(f"cannot split {len(names)} tensors into {shards} shards")
    if tokenizer:
        _check_tokenizer_vocab(int(config["vocab_size"]))
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg = dict(config)
    cfg["torch_dtype"] = _TORCH_DTYPE_NAMES[st]

    if shards <= 1:
        write_safetensors(os.path.join(path, "model.safetensors"), weights, st)
    else:
        # Greedy split by bytes, keeping name order; every shard gets at least one tensor.
        sizes = [int(np.asarray(weights[n]).size) for n in names]
        total = sum(sizes)
        groups: list[list[str]] = [[] for _ in range(shards)]
        acc = 0
        for i, (name, size) in enumerate(zip(names, sizes)):
            k = min(shards - 1, acc * shards // max(total, 1))
            k = max(k, min(shards - 1, shards - (len(names) - i)))  # leave one per later shard
            groups[k].append(name)
            acc += size
        # Fill any empty shard from its neighbour (tiny models: a few large tensors dominate).
        for k in range(shards):
            if not groups[k]:
                donor = max(range(shards), key=lambda j: len(groups[j]))
                groups[k].append(groups[donor].pop())
        weight_map: dict[str, str] = {}
        total_size = 0
        for k, group in enumerate(groups):
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: weights[n] for n in group}
            write_safetensors(os.path.join(path, fname), part, st)
            for n in group:
                weight_map[n] = fname
                total_size += int(np.asarray(weights[n]).size) * SAFETENSORS_DTYPES[st][1]
        index = {
            "metadata": {"total_size": total_size},
            "weight_map": dict(sorted(weight_map.items())),
        }
        _write_json(os.path.join(path, "model.safetensors.index.json"), index)

    if tokenizer:
        write_tokenizer(path, int(config["vocab_size"]))
    _write_json(os.path.join(path, "config.json"), cfg)
    return path


def make_tiny_checkpoint(
    path: PathLike,
    *,
    seed: int = 0,
    dtype: str = "f32",
    shards: int = 1,
    tokenizer: bool = True,
    **config_overrides: Any,
) -> str:
    """`random_plm_config(**config_overrides)` + `random_plm_weights(seed)` written to ``path``."""
    config = random_plm_config(**config_overrides)
    weights = random_plm_weights(config, seed)
    return write_checkpoint(path, config, weights, dtype=dtype, shards=shards, tokenizer=tokenizer)
