"""Write a sparselm / Hugging Face PLM checkpoint as a GGUF file that llama.cpp runs (arch "plm").

Used to run llama.cpp side by side with sparselm on the *same weights* (issue #3). Needs the
optional PyPI packages ``gguf`` (writer) and, for ``--check``, ``llama-cpp-python``.

    python benches/gguf_export.py MODEL_DIR OUT.gguf --dtype q8_0    # f16 | q8_0 | q4_0
    python benches/gguf_export.py --check                            # tiny model: llama.cpp vs sparselm

What the file holds (facts from llama.cpp's ``plm`` architecture, src/models/plm.cpp, and its
converter's ``PLMModel``):
  * tensors are only renamed (``model.embed_tokens`` -> ``token_embd``, ``self_attn.q_proj`` ->
    ``blk.N.attn_q``, ``kv_a_proj_with_mqa`` -> ``attn_kv_a_mqa``, ``kv_b_proj`` -> ``attn_kv_b``
    as ONE tensor, not split into k_b/v_b, ...), same memory layout (GGUF lists dims as
    (in, out)). No permutation: llama.cpp ropes PLM with LLAMA_ROPE_TYPE_NORM, i.e. adjacent
    pairs, on the last ``qk_rope_head_dim`` values of each query head and on the shared key;
  * the output head is tied: llama.cpp reuses ``token_embd`` (no ``output.weight`` is written);
  * ``plm.*`` hyper-parameters (block_count, embedding_length, feed_forward_length,
    attention.head_count(_kv), attention.kv_lora_rank, attention.key_length = nope + rope,
    attention.value_length, rope.dimension_count = qk_rope_head_dim, rope.freq_base,
    attention.layer_norm_rms_epsilon, context_length, vocab_size);
  * a "gpt2" BPE tokenizer with the "qwen2" pre-tokenizer, built from the directory's
    tokenizer.json; a directory without one (the PLM-1.8B-shaped bench checkpoint) gets the
    small byte-level BPE of ``sparselm.testing.tokenizer_json``. Rows past the tokenizer are
    ``[PADn]`` tokens of type UNUSED, as llama.cpp's converter writes them;
  * weights: RMSNorm vectors in F32; every matrix in the requested format. Q8_0 / Q4_0 are
    quantized with ``gguf.quants`` (ggml's reference rounding) for *every* matrix, embedding
    included -- the same blocks sparselm builds on load. (``llama-quantize`` would keep the
    tied embedding at Q6_K for a Q4_0 file; a pure file compares like with like.)

The file is written tensor by tensor (peak memory about one f32 matrix) to a temporary file
next to the output, then renamed.

``--check`` builds a seeded random tiny checkpoint with ``sparselm.testing``, exports it, runs
llama.cpp (``llama_cpp.Llama``, ``flash_attn=False``: llama.cpp's PLM path aborts with flash
attention) on token ids and compares its logits with sparselm's and with the float64 NumPy
reference (``sparselm.reference``, on the f16-rounded matrices), per format. It prints
max|d|/max|logit| and top-1 agreement, and exits 1 when the f16 logits of llama.cpp are more
than 1e-2 of max|logit| off the reference (a broken export). At f16 the engines hold identical
weights: llama.cpp matches the reference to ~6e-4 (it rounds activations and its K/V cache to
f16), sparselm to ~5e-7 with ``SPARSELM_EXACT_GEMM=1`` and ~7e-3 by default on CPUs with
AVX512_BF16 or AMX, whose prompt GEMMs round activations to bf16. At q8_0/q4_0 most of the weights are identical blocks, but not ``down_proj``:
sparselm stores W_down transposed and quantizes it along the hidden dimension, GGUF along the
intermediate dimension, so q4_0 logits differ by ~1e-1 of max|logit| on this random model
(same bytes per weight, different rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

DTYPES = ("f16", "q8_0", "q4_0")

#: Bump when the bytes ``export_gguf`` writes change: cached GGUFs of an older version are
#: exported again (see ``ensure_gguf``).
EXPORT_VERSION = 1

#: HF suffix (after ``model.layers.N.``) -> llama.cpp MODEL_TENSOR member name, for arch PLM.
_LAYER_TENSORS = {
    "input_layernorm.weight": "ATTN_NORM",
    "self_attn.q_proj.weight": "ATTN_Q",
    "self_attn.kv_a_proj_with_mqa.weight": "ATTN_KV_A_MQA",
    "self_attn.kv_a_layernorm.weight": "ATTN_KV_A_NORM",
    "self_attn.kv_b_proj.weight": "ATTN_KV_B",
    "self_attn.o_proj.weight": "ATTN_OUT",
    "post_attention_layernorm.weight": "FFN_NORM",
    "mlp.up_proj.weight": "FFN_UP",
    "mlp.down_proj.weight": "FFN_DOWN",
}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": "TOKEN_EMBD", "model.norm.weight": "OUTPUT_NORM"}


# ----------------------------------------------------------------------------------------------
# reading the checkpoint (memory-mapped, one tensor at a time)
# ----------------------------------------------------------------------------------------------

_ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}


def _safetensors_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{model_dir}: no model.safetensors or model.safetensors.index.json"
        )
    weight_map = json.loads(index.read_text())["weight_map"]
    return [model_dir / name for name in sorted(set(weight_map.values()))]


class _Checkpoint:
    """Name -> lazily read float32 array, over every safetensors file of a model directory."""

    def __init__(self, model_dir: Path):
        self._where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for path in _safetensors_files(model_dir):
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (path, 8 + n, info)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._where[name][2]["shape"])

    def f32(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor (or a slice of its rows) as float32; F16/BF16 widen exactly."""
        path, base, info = self._where[name]
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise ValueError(
                f"{path}: tensor {name} has dtype {info['dtype']}, expected F32/F16/BF16"
            )
        start, _end = info["data_offsets"]
        raw = np.memmap(path, dtype=dt, mode="r", offset=base + start, shape=tuple(info["shape"]))
        part = raw if rows is None else raw[rows]
        if info["dtype"] == "BF16":
            return (part.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return np.asarray(part, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# tokenizer metadata
# ----------------------------------------------------------------------------------------------


def _vocab(model_dir: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """tokens / token types / merges / special ids for a "gpt2" GGUF vocabulary of vocab_size rows."""
    import gguf

    vocab_size = int(config["vocab_size"])
    tok_path = model_dir / "tokenizer.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text(encoding="utf-8"))
    else:
        # The PLM-1.8B-shaped bench checkpoint ships no tokenizer: use the small trained byte-level
        # BPE of sparselm.testing (same construction as its write_tokenizer). Benchmarks feed ids.
        from sparselm.testing import SPECIAL_TOKENS, tokenizer_json

        tok = json.loads(tokenizer_json(max(256, min(vocab_size - len(SPECIAL_TOKENS) - 8, 2000))))
    model = tok["model"]
    if model.get("type") != "BPE":
        raise ValueError(
            f"{tok_path}: a BPE tokenizer is needed for a gpt2 GGUF vocab, got {model.get('type')}"
        )
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, i in model["vocab"].items():
        if i >= vocab_size:
            raise ValueError(f"token {text!r} has id {i} >= vocab_size {vocab_size}")
        tokens[i] = text
        types[i] = int(gguf.TokenType.NORMAL)
    by_content: dict[str, int] = {}
    for t in tok.get("added_tokens", []):
        i = int(t["id"])
        if i >= vocab_size:
            raise ValueError(f"added token {t['content']!r} has id {i} >= vocab_size {vocab_size}")
        tokens[i] = t["content"]
        types[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
        by_content[t["content"]] = i
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
    # merges are "a b" strings (older tokenizer.json) or [a, b] pairs (newer); GGUF wants "a b".
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def special(key: str, *fallbacks: str) -> int | None:
        v = config.get(key)
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int) and 0 <= v < vocab_size:
            return v
        return next((by_content[f] for f in fallbacks if f in by_content), None)

    chat_template = None
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        chat_template = json.loads(cfg_path.read_text(encoding="utf-8")).get("chat_template")
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": special("bos_token_id", "<|endoftext|>"),
        "eos": special("eos_token_id", "<|im_end|>", "<|endoftext|>"),
        "pad": by_content.get("<|endoftext|>"),
        "chat_template": chat_template if isinstance(chat_template, str) else None,
    }


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------


def _check_config(config: Mapping[str, Any]) -> None:
    if config.get("model_type") != "plm":
        raise ValueError(
            f"model_type {config.get('model_type')!r}: only PLM checkpoints export to arch plm"
        )
    if config.get("q_lora_rank") is not None:
        raise ValueError("llama.cpp's plm architecture has no q LoRA (q_lora_rank must be null)")
    if not config.get("tie_word_embeddings", True):
        raise ValueError("llama.cpp's plm architecture always ties the output head to token_embd")
    if config.get("rope_scaling"):
        raise ValueError("rope_scaling is not exported (PLM-1.8B has none)")


def _tensor_plan(config: Mapping[str, Any], names: set[str]) -> Iterator[tuple[str, str]]:
    """(HF name, GGUF name) for every tensor, in checkpoint order."""
    import gguf
    from sparselm.testing import tensor_shapes

    arch = gguf.MODEL_ARCH.PLM
    allowed = set(gguf.MODEL_TENSORS[arch])
    expected = tensor_shapes(config)
    missing = sorted(set(expected) - names)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for hf in expected:
        if hf in _GLOBAL_TENSORS:
            kind, bid = _GLOBAL_TENSORS[hf], None
        else:
            parts = hf.split(".", 3)  # model, layers, N, suffix
            kind, bid = _LAYER_TENSORS[parts[3]], int(parts[2])
        member = gguf.MODEL_TENSOR[kind]
        assert member in allowed, (member, arch)
        name = gguf.TENSOR_NAMES[member]
        yield hf, (name.format(bid=bid) if bid is not None else name) + ".weight"


def _encode(ckpt: _Checkpoint, hf: str, dtype: str) -> np.ndarray:
    """The bytes of one tensor as written: F32 norms, F16 matrices or Q8_0/Q4_0 blocks (uint8)."""
    import gguf

    shape = ckpt.shape(hf)
    if len(shape) == 1:  # RMSNorm weights stay F32, as llama.cpp's converter keeps them
        return ckpt.f32(hf)
    if dtype == "f16":
        return ckpt.f32(hf).astype(np.float16)
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[dtype]
    rows, cols = shape
    if cols % 32:
        raise ValueError(f"{hf}: {cols} columns is not a multiple of the 32-weight block")
    out = np.empty((rows, cols // 32 * (34 if dtype == "q8_0" else 18)), dtype=np.uint8)
    step = max(1, (1 << 24) // cols)  # quantize ~16 M weights at a time
    for r in range(0, rows, step):
        out[r : r + step] = gguf.quants.quantize(ckpt.f32(hf, slice(r, r + step)), qtype)
    return out


def export_gguf(
    hf_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], dtype: str = "f16"
) -> Path:
    """Write the checkpoint in ``hf_dir`` as a llama.cpp ``plm`` GGUF at ``out_path``; return it.

    ``dtype`` is ``"f16"``, ``"q8_0"`` or ``"q4_0"`` (matrices; norms are always F32). Written to a
    temporary file in the same directory and renamed, so a crash never leaves a partial file.
    """
    import gguf

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    model_dir = Path(hf_dir)
    out_path = Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    _check_config(config)
    ckpt = _Checkpoint(model_dir)
    plan = list(_tensor_plan(config, ckpt.names()))
    vocab = _vocab(model_dir, config)

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PLM]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=out_path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        nope, rope = int(config["qk_nope_head_dim"]), int(config["qk_rope_head_dim"])
        w.add_name(model_dir.name)
        w.add_file_type(
            {
                "f16": gguf.LlamaFileType.MOSTLY_F16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            }[dtype]
        )
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_block_count(int(config["num_hidden_layers"]))
        w.add_context_length(int(config["max_position_embeddings"]))
        w.add_embedding_length(int(config["hidden_size"]))
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(int(config["num_attention_heads"]))
        # MLA: every head has its own decompressed K/V in llama.cpp's cache.
        w.add_head_count_kv(int(config["num_attention_heads"]))
        w.add_rope_freq_base(float(config["rope_theta"]))
        w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        w.add_vocab_size(int(config["vocab_size"]))
        w.add_kv_lora_rank(int(config["kv_lora_rank"]))
        w.add_key_length(nope + rope)
        w.add_value_length(int(config["v_head_dim"]))
        w.add_rope_dimension_count(rope)

        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        if vocab["bos"] is not None:
            w.add_bos_token_id(vocab["bos"])
        if vocab["eos"] is not None:
            w.add_eos_token_id(vocab["eos"])
        if vocab["pad"] is not None:
            w.add_pad_token_id(vocab["pad"])
        w.add_add_bos_token(False)  # PLM / Qwen2 never add a BOS
        if vocab["chat_template"]:
            w.add_chat_template(vocab["chat_template"])

        # Header first (tensor infos need only shapes and byte sizes), then the data streamed.
        for hf, name in plan:
            shape = ckpt.shape(hf)
            if len(shape) == 1 or dtype == "f16":
                np_dtype = np.float32 if len(shape) == 1 else np.float16
                w.add_tensor_info(
                    name,
                    shape,
                    np.dtype(np_dtype),
                    int(np.prod(shape)) * np.dtype(np_dtype).itemsize,
                )
            else:
                qtype = (
                    gguf.GGMLQuantizationType.Q8_0
                    if dtype == "q8_0"
                    else gguf.GGMLQuantizationType.Q4_0
                )
                byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                w.add_tensor_info(
                    name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype
                )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for hf, _name in plan:
            w.write_tensor_data(_encode(ckpt, hf, dtype))
        w.close()
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return out_path


def gguf_path_for(model_dir: str | os.PathLike[str], dtype: str) -> Path:
    """Where benchmarks cache the GGUF of a checkpoint: in the bench cache (never next to the
    checkpoint, which may be in the repository or a hub cache), named after the directory and
    a hash of its absolute path: ``gguf/<dir>-<hash>-<dtype>.gguf``."""
    import hashlib

    from plm_checkpoint import bench_cache_dir  # benches/ is on the path of its users

    d = Path(model_dir).resolve()
    tag = hashlib.sha1(str(d).encode()).hexdigest()[:10]
    return bench_cache_dir() / "gguf" / f"{d.name}-{tag}-{dtype}.gguf"


def _source_fingerprint(model_dir: Path) -> dict[str, Any]:
    """What a cached GGUF was made from: the checkpoint's files (size, mtime), the exporter's
    ``EXPORT_VERSION`` and the gguf package version. Any change means a new export."""
    import gguf

    files = sorted(
        p
        for p in model_dir.iterdir()
        if p.suffix in (".safetensors", ".json") and p.name != "generation_config.json"
    )
    return {
        "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
        "exporter": EXPORT_VERSION,
        "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def ensure_gguf(model_dir: str | os.PathLike[str], dtype: str) -> Path:
    """The cached GGUF of ``model_dir`` in ``dtype``, exported first if absent or made from
    other files (see ``_source_fingerprint``; kept in ``<file>.source.json``)."""
    from plm_checkpoint import write_atomic

    out = gguf_path_for(model_dir, dtype)
    stamp = out.with_name(out.name + ".source.json")
    want = _source_fingerprint(Path(model_dir).resolve())
    try:
        fresh = out.is_file() and json.loads(stamp.read_text()) == want
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        print(f"exporting {out} ...", file=sys.stderr, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)
        export_gguf(model_dir, out, dtype)
        write_atomic(stamp, json.dumps(want))
    return out


# ----------------------------------------------------------------------------------------------
# --check: llama.cpp vs sparselm on a tiny random model
# ----------------------------------------------------------------------------------------------

#: Dimensions llama.cpp accepts (block-aligned rows for Q8_0/Q4_0), small enough to run in seconds.
CHECK_CONFIG: dict[str, Any] = {
    "vocab_size": 640,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "max_position_embeddings": 512,
}


def llama_logits(gguf_file: Path, ids: list[int], threads: int = 2) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for a token-id prompt (no tokenization)."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf_file),
        n_ctx=max(64, len(ids) + 8),
        n_batch=max(64, len(ids)),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        flash_attn=False,  # llama.cpp's PLM graph aborts with flash attention
        verbose=False,
    )
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def check(
    dtypes: tuple[str, ...] = DTYPES, n_tokens: int = 48, seed: int = 0, keep: str | None = None
) -> dict[str, Any]:
    """Export a seeded tiny checkpoint per format, compare llama.cpp, sparselm and the f64 reference."""

    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="sparselm-gguf-check-"))
    try:
        return _check_in(work, dtypes, n_tokens, seed)
    finally:
        if not keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def _check_in(work: Path, dtypes: tuple[str, ...], n_tokens: int, seed: int) -> dict[str, Any]:
    import sparselm
    from sparselm.reference import reference_logits
    from sparselm.testing import (
        make_tiny_checkpoint,
        random_plm_config,
        random_plm_weights,
        round_to_dtype,
    )

    model_dir = work / "tiny-plm"
    make_tiny_checkpoint(model_dir, seed=seed, dtype="f32", **CHECK_CONFIG)
    config = random_plm_config(**CHECK_CONFIG)
    rng = np.random.default_rng(seed + 1)
    ids = [int(i) for i in rng.integers(0, config["vocab_size"], n_tokens)]

    # float64 reference on the weights both engines hold in the f16 runs: matrices rounded to f16,
    # RMSNorm vectors kept in f32 (llama.cpp's file and sparselm both keep norms in f32).
    w16 = {
        k: round_to_dtype(v, "f16") if v.ndim == 2 else v
        for k, v in random_plm_weights(config, seed).items()
    }
    ref = reference_logits(config, w16, ids)
    results: dict[str, Any] = {"config": CHECK_CONFIG, "tokens": n_tokens}
    for dtype in dtypes:
        path = export_gguf(model_dir, work / f"tiny-plm-{dtype}.gguf", dtype)
        ll = llama_logits(path, ids)
        sp = sparselm.load(model_dir, dtype=dtype, threads=2).logits(ids)
        r = {
            "llama_vs_sparselm": _rel(ll, sp),
            "llama_vs_ref_f16": _rel(ll, ref),
            "sparselm_vs_ref_f16": _rel(sp, ref),
            "top1_agree_llama_sparselm": float(np.mean(ll.argmax(-1) == sp.argmax(-1))),
            "gguf_bytes": path.stat().st_size,
        }
        results[dtype] = r
        print(
            f"{dtype:>5}: max|d|/max|logit| llama.cpp vs sparselm {r['llama_vs_sparselm']:.2e} | "
            f"vs f64 reference on the f16 weights: llama.cpp {r['llama_vs_ref_f16']:.2e}, sparselm "
            f"{r['sparselm_vs_ref_f16']:.2e} | top-1 agreement {100 * r['top1_agree_llama_sparselm']:.1f}%",
            flush=True,
        )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model_dir", nargs="?", help="HF PLM checkpoint directory")
    ap.add_argument("out", nargs="?", help="output .gguf path")
    ap.add_argument("--dtype", default="f16", choices=DTYPES)
    ap.add_argument("--check", action="store_true", help="tiny-model logit check against llama.cpp")
    ap.add_argument("--check-dtypes", default=",".join(DTYPES))
    ap.add_argument("--keep", help="with --check: keep the checkpoint and GGUFs in this directory")
    ap.add_argument("--json", help="with --check: write the numbers here")
    a = ap.parse_args()
    if a.check:
        res = check(tuple(a.check_dtypes.split(",")), keep=a.keep)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))
        if "f16" in res and res["f16"]["llama_vs_ref_f16"] > 1e-2:
            raise SystemExit("llama.cpp's f16 logits are off the reference: the export is wrong")
        return
    if not a.model_dir or not a.out:
        ap.error("MODEL_DIR and OUT are required (or use --check)")
    print(export_gguf(a.model_dir, a.out, a.dtype))


if __name__ == "__main__":
    main()
