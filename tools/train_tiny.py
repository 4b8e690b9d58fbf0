#!/usr/bin/env python3
"""Train ``plm-tiny``: a small PLM-architecture model that ships inside the sparselm package.

What this script owns: the whole recipe, from fetching the corpus to the files in the output
directory (``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``,
``validation.txt``, ``metrics.json``, ``README.md``). Nothing is downloaded except through the
ordinary package clients (``apt-get download``); no model or data set comes from a hub.

The model follows ``shared/docs/plm-architecture.md`` exactly, written from that page:

* MLA attention without q-LoRA: ``q_proj``; ``kv_a_proj_with_mqa`` -> latent ``c`` (kv_lora_rank)
  and one shared rope key (qk_rope_head_dim); ``kv_a_layernorm`` (RMSNorm) on ``c``; ``kv_b_proj``
  -> per head ``k_nope`` then ``v``; RoPE on ADJACENT pairs ``(x[2i], x[2i+1])`` with angle
  ``p * theta^(-2i/rope_dim)``; softmax scale ``1/sqrt(qk_nope + qk_rope)``; ``o_proj``.
* MLP ``down(relu(up x)^2)`` with no gate; pre-RMSNorm residual blocks; final ``model.norm``;
  tied embeddings (no ``lm_head.weight``); no biases anywhere.

Corpus: Jane Austen's six novels (public domain), as shipped by Debian's ``r-cran-janeaustenr``
(MIT). The .deb is fetched with ``apt-get download`` and unpacked with ``dpkg-deb`` -- R itself is
not needed: the texts sit in an R lazy-load database, read here by a minimal R unserializer.

Invariants: everything is seeded and runs with a fixed thread count (default 1), so a re-run on
the same CPU and torch version gives the same weights. Metrics in the model card are measured on
the bf16 weights that ship, upcast to float32.

Reproduce (about an hour on one core)::

    nice -n 10 python tools/train_tiny.py --out python/sparselm/models/plm-tiny

Smoke run (about a minute, checks the whole pipeline)::

    python tools/train_tiny.py --smoke --out /tmp/plm-tiny-smoke
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split pattern (byte-level BPE like PLM's tokenizer).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS_DEB = "r-cran-janeaustenr"
NOVELS = {  # R object name -> title, in a fixed order
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# Corpus: fetch the Debian package, read the R lazy-load database, clean, split.
# --------------------------------------------------------------------------------------------


class _RReader:
    """Minimal reader for R's XDR serialization format (version 2 or 3).

    Handles exactly what a data package of character vectors needs: NULL, symbols, pairlists,
    CHARSXP, logical/integer/real/character vectors and generic lists (with ``names`` turned into
    a dict). Anything else raises, so a format change fails loudly instead of yielding garbage.
    """

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization stream")
        self.b, self.i, self.refs = data, 2, []
        version = self._int()
        self._int()  # writer R version
        self._int()  # minimal reader R version
        if version == 3:
            n = self._int()  # length of the native encoding name, then the name
            self.i += n
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def item(self):  # one branch per SEXP type, like R's own ReadItem
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 253, 252, 251, 250, 242, 241):  # NULL and singleton environments
            return None
        if kind == 255:  # reference to an earlier symbol
            idx = flags >> 8
            return self.refs[(idx or self._int()) - 1]
        if kind == 1:  # SYMSXP
            sym = ("sym", self.item())
            self.refs.append(sym)
            return sym
        if kind in (2, 6, 239, 240):  # pairlist / language
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            return [(tag, car)] + (cdr if isinstance(cdr, list) else [])
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            s = self.b[self.i : self.i + n].decode("utf-8")
            self.i += n
            return s
        if kind in (10, 13):  # logical, integer
            n = self._length()
            val = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif kind == 14:  # real
            n = self._length()
            val = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif kind in (16, 19, 20):  # character vector, list, expression
            val = [self.item() for _ in range(self._length())]
        else:
            raise ValueError(f"unsupported R object type {kind}")
        if has_attr:
            attrs = self.item() or []
            names = [v for tag, v in attrs if tag == ("sym", "names")]
            if names and kind == 19:
                return dict(zip(names[0], val))
        return val


def _read_lazyload_db(prefix: Path) -> dict[str, list[str]]:
    """Read every object of an R lazy-load database (``prefix.rdx`` + ``prefix.rdb``)."""
    index = _RReader(gzip.decompress(prefix.with_suffix(".rdx").read_bytes())).item()
    blob = prefix.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[offset : offset + length]
        # 4-byte big-endian uncompressed length, then a zlib stream (R's compress type 1).
        (raw_len,) = struct.unpack(">i", chunk[:4])
        raw = zlib.decompress(chunk[4:])
        if len(raw) != raw_len:
            raise ValueError(f"{name}: corrupt lazy-load entry")
        out[name] = _RReader(raw).item()
    return out


def fetch_corpus(cache: Path) -> tuple[dict[str, list[str]], str]:
    """Download and unpack the Debian package; return {novel: lines} and its copyright text."""
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{CORPUS_DEB}_*.deb"))
    if not debs:
        log(f"corpus: apt-get update && apt-get download {CORPUS_DEB}")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        # apt's sandbox user may not write to the cache dir; download in a temp dir it owns.
        with tempfile.TemporaryDirectory() as tmp:
            os.chmod(tmp, 0o777)
            subprocess.run(["apt-get", "download", "-qq", CORPUS_DEB], check=True, cwd=tmp)
            for f in Path(tmp).glob("*.deb"):
                shutil.copy(f, cache / f.name)
        debs = sorted(cache.glob(f"{CORPUS_DEB}_*.deb"))
    deb = debs[-1]
    root = cache / "extracted"
    if root.exists():
        shutil.rmtree(root)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    data = _read_lazyload_db(root / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    copyright_text = (root / f"usr/share/doc/{CORPUS_DEB}/copyright").read_text()
    log(f"corpus: {deb.name}: {', '.join(f'{k} ({len(v)} lines)' for k, v in data.items())}")
    return data, copyright_text


def _is_heading(par: str) -> bool:
    """Titles, 'CHAPTER IV', 'VOLUME II', 'By Jane Austen', 'FINIS', 'THE END'."""
    letters = [c for c in par if c.isalpha()]
    return (
        (len(par) < 60 and letters and all(c.isupper() for c in letters))
        or par
        in (
            "By Jane Austen",
            "by Jane Austen",
        )
        or par.lower().startswith("chapter ")
    )


def clean_novel(lines: list[str]) -> list[str]:
    """Turn a novel's line vector into chapters, each a string of paragraphs.

    Lines are joined into paragraphs (blank line = break), Gutenberg italics ``_word_`` lose
    their underscores, whitespace is normalised, text is NFC. A chapter ends at each heading.
    """
    paragraphs, cur = [], []
    for line in lines + [""]:
        line = (line or "").strip()
        if line:
            cur.append(line)
        elif cur:
            paragraphs.append(" ".join(cur))
            cur = []
    chapters, cur = [], []
    for par in paragraphs:
        par = unicodedata.normalize("NFC", " ".join(par.replace("_", "").split()))
        if not par:
            continue
        if _is_heading(par):
            if cur:
                chapters.append("\n\n".join(cur))
                cur = []
            continue
        cur.append(par)
    if cur:
        chapters.append("\n\n".join(cur))
    return chapters


def split_corpus(
    novels: dict[str, list[str]], val_frac: float, seed: int, val_max_bytes: int
) -> tuple[list[str], list[str]]:
    """Hold out whole chapters (seeded) for validation; return (train chapters, val chapters)."""
    chapters = []
    for key in NOVELS:
        chapters.extend(clean_novel(novels[key]))
    rng = random.Random(seed)
    order = list(range(len(chapters)))
    rng.shuffle(order)
    total = sum(len(c) for c in chapters)
    val_idx: set[int] = set()
    val_chars = 0
    for i in order:
        if val_chars >= val_frac * total:
            break
        if val_chars + len(chapters[i]) > val_max_bytes:
            continue
        val_idx.add(i)
        val_chars += len(chapters[i])
    train = [c for i, c in enumerate(chapters) if i not in val_idx]
    val = [c for i, c in enumerate(chapters) if i in val_idx]  # book order
    return train, val


# --------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE like Qwen2's, specials right after the regular vocabulary.
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], n_regular: int):
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=n_regular,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != n_regular:
        raise RuntimeError(f"BPE produced {tok.get_vocab_size()} tokens, wanted {n_regular}")
    tok.add_special_tokens(SPECIAL_TOKENS)  # ids n_regular, n_regular+1, n_regular+2
    return tok


def tokenizer_config(tok, max_len: int) -> dict:
    added = {}
    for name in SPECIAL_TOKENS:
        added[str(tok.token_to_id(name))] = {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": max_len,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# --------------------------------------------------------------------------------------------
# Model: PLM, module names identical to the Hugging Face tensor names.
# --------------------------------------------------------------------------------------------


@dataclass
class PLMConfig:
    vocab_size: int = 6016
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    kv_lora_rank: int = 96
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    rope_theta: float = 100000.0
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6

    def hf_dict(self, bos: int, eos: int) -> dict:
        d = {"architectures": ["PLMForCausalLM"], "model_type": "plm"}
        d.update(asdict(self))
        d.update(
            {
                "num_key_value_heads": self.num_attention_heads,  # meaningless for MLA
                "hidden_act": "relu2",
                "q_lora_rank": None,
                "rope_scaling": None,
                "tie_word_embeddings": True,
                "attention_bias": False,
                "attention_dropout": 0.0,
                "initializer_range": 0.02,
                "use_cache": True,
                "torch_dtype": "bfloat16",
                "bos_token_id": bos,
                "eos_token_id": eos,
            }
        )
        return dict(sorted(d.items()))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # g * x / sqrt(mean(x^2) + eps), computed in float32
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(cfg: PLMConfig, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [n, rope/2]: angle p * theta^(-2i/rope) for pair i."""
    d = cfg.qk_rope_head_dim
    inv = cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    ang = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ADJACENT pairs (x[2i], x[2i+1]). x [..., T, rope]; cos/sin [T, rope/2]."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    return torch.stack((y0, y1), dim=-1).flatten(-2)


class PLMAttention(nn.Module):
    def __init__(self, cfg: PLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, nh = cfg.hidden_size, cfg.num_attention_heads
        self.q_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.q_proj = nn.Linear(h, nh * self.q_head, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(
            cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(nh * cfg.v_head_dim, h, bias=False)

    def forward(self, a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        B, T, _ = a.shape
        nh, nope, rope, vd = (
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
        )
        q = self.q_proj(a).view(B, T, nh, nope + rope).transpose(1, 2)  # [B, H, T, nope+rope]
        q_nope, q_rope = q[..., :nope], q[..., nope:]
        ckr = self.kv_a_proj_with_mqa(a)  # [B, T, r + rope]
        lat, k_rope = ckr[..., : c.kv_lora_rank], ckr[..., c.kv_lora_rank :]
        lat = self.kv_a_layernorm(lat)  # c = RMSNorm(c)
        kv = self.kv_b_proj(lat).view(B, T, nh, nope + vd).transpose(1, 2)  # [B, H, T, nope+v]
        k_nope, v = kv[..., :nope], kv[..., nope:]
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope, cos, sin)[:, None].expand(B, nh, T, rope)  # shared by heads
        qq = torch.cat((q_nope, q_rope), dim=-1)
        kk = torch.cat((k_nope, k_rope), dim=-1)
        o = F.scaled_dot_product_attention(
            qq, kk, v, is_causal=True, scale=1.0 / math.sqrt(nope + rope)
        )  # [B, H, T, v]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, nh * vd))  # head-major concat


class PLMMLP(nn.Module):
    def __init__(self, cfg: PLMConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.stats: list | None = None  # when a list, forward appends (zeros, total)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        act = torch.relu(self.up_proj(b)).square()  # relu(up b)^2, no gate
        if self.stats is not None:
            self.stats.append((int((act == 0).sum()), act.numel()))
        return self.down_proj(act)


class PLMDecoderLayer(nn.Module):
    def __init__(self, cfg: PLMConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)  # training-time regulariser only; inference has none
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = PLMAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = PLMMLP(cfg)

    def forward(self, h, cos, sin):
        h = h + self.drop(self.self_attn(self.input_layernorm(h), cos, sin))
        return h + self.drop(self.mlp(self.post_attention_layernorm(h)))


class PLMModel(nn.Module):
    def __init__(self, cfg: PLMConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            PLMDecoderLayer(cfg, dropout) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class PLMForCausalLM(nn.Module):
    def __init__(self, cfg: PLMConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = PLMModel(cfg, dropout)
        cos, sin = rope_tables(cfg, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        std = 0.02
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.data.normal_(0.0, std / math.sqrt(2 * self.cfg.num_hidden_layers), generator=g)
            else:
                p.data.normal_(0.0, std, generator=g)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        if T > self.cfg.max_position_embeddings:
            raise ValueError("sequence longer than max_position_embeddings")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        h = self.model.embed_tokens(ids)  # no embedding scale
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        h = self.model.norm(h)
        return h @ self.model.embed_tokens.weight.t()  # tied output, all vocab_size rows


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Evaluation helpers
# --------------------------------------------------------------------------------------------


def val_windows(ids: list[int], seq: int) -> torch.Tensor:
    """Non-overlapping windows of `seq` tokens; the last partial window is dropped."""
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq], dtype=torch.long).view(n, seq)


@torch.no_grad()
def evaluate(model: PLMForCausalLM, windows: torch.Tensor, batch: int, sparsity: bool = False):
    """Mean next-token NLL over every window (predict tokens 1..seq-1 of each window).

    With `sparsity`, also return per-layer fraction of exact zeros in relu(up x)^2.
    """
    model.eval()
    mlps = [layer.mlp for layer in model.model.layers]
    if sparsity:
        for m in mlps:
            m.stats = []
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = model(w[:, :-1]).float()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += w[:, 1:].numel()
    per_layer = None
    if sparsity:
        per_layer = [sum(z for z, _ in m.stats) / sum(t for _, t in m.stats) for m in mlps]
        for m in mlps:
            m.stats = None
    model.train()
    return nll / count, per_layer


@torch.no_grad()
def greedy(model: PLMForCausalLM, ids: list[int], n: int, stop: set[int]) -> list[int]:
    model.eval()
    out = list(ids)
    for _ in range(n):
        nxt = int(model(torch.tensor([out[-model.cfg.max_position_embeddings :]]))[0, -1].argmax())
        out.append(nxt)
        if nxt in stop:
            break
    model.train()
    return out[len(ids) :]


def verify_against_transformers(model: PLMForCausalLM, seed: int) -> float:
    """Max relative logit error of our forward vs transformers' DeepseekV2 (doc §6 mapping)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    c = model.cfg
    hf_cfg = DeepseekV2Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads,
        kv_lora_rank=c.kv_lora_rank,
        q_lora_rank=None,
        qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim,
        hidden_act="relu",
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=True,
        attention_bias=False,
        first_k_dense_replace=c.num_hidden_layers,
    )
    hf_cfg._attn_implementation = "eager"
    hf = DeepseekV2ForCausalLM(hf_cfg).double().eval()
    sd = {k: v.double() for k, v in model.state_dict().items()}
    for k in list(sd):
        if k.endswith("mlp.up_proj.weight"):
            sd[k.replace("up_proj", "gate_proj")] = sd[k]  # relu(z) * z == relu(z)^2
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"transformers mapping: missing={missing} unexpected={unexpected}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, c.vocab_size, (2, 37), generator=g)
    model.eval()
    with torch.no_grad():
        ours = model.double()(ids)
        theirs = hf(ids).logits
    model.float().train()
    return float((ours - theirs).abs().max() / theirs.abs().max())


# --------------------------------------------------------------------------------------------
# Artifact writing and checking
# --------------------------------------------------------------------------------------------


def expected_shapes(c: PLMConfig) -> dict[str, tuple[int, ...]]:
    nh = c.num_attention_heads
    s = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (c.hidden_size,)
        s[p + "self_attn.q_proj.weight"] = (
            nh * (c.qk_nope_head_dim + c.qk_rope_head_dim),
            c.hidden_size,
        )
        s[p + "self_attn.kv_a_proj_with_mqa.weight"] = (
            c.kv_lora_rank + c.qk_rope_head_dim,
            c.hidden_size,
        )
        s[p + "self_attn.kv_a_layernorm.weight"] = (c.kv_lora_rank,)
        s[p + "self_attn.kv_b_proj.weight"] = (
            nh * (c.qk_nope_head_dim + c.v_head_dim),
            c.kv_lora_rank,
        )
        s[p + "self_attn.o_proj.weight"] = (c.hidden_size, nh * c.v_head_dim)
        s[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
        s[p + "mlp.up_proj.weight"] = (c.intermediate_size, c.hidden_size)
        s[p + "mlp.down_proj.weight"] = (c.hidden_size, c.intermediate_size)
    return s


def save_weights(model: PLMForCausalLM, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {
        k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in model.state_dict().items()
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)  # save_file creates the file owner-only; it ships in a wheel


def load_and_check_weights(path: Path, cfg: PLMConfig) -> dict[str, torch.Tensor]:
    """Re-read the file with `safetensors` and check names, shapes and dtype exactly."""
    from safetensors import safe_open

    want = expected_shapes(cfg)
    out = {}
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        if names != set(want):
            raise RuntimeError(
                f"tensor names differ: extra={names - set(want)} missing={set(want) - names}"
            )
        for k in sorted(names):
            t = f.get_tensor(k)
            if tuple(t.shape) != want[k] or t.dtype != torch.bfloat16:
                raise RuntimeError(f"{k}: got {tuple(t.shape)} {t.dtype}, want {want[k]} bf16")
            out[k] = t
    return out


def check_tokenizer(path: Path, sample: str, n_regular: int) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    for text in (sample, "Once upon a time, café naïve — “quoted” 1234 \n\n  tabs\tend", ""):
        if tok.decode(tok.encode(text).ids, skip_special_tokens=False) != unicodedata.normalize(
            "NFC", text
        ):
            raise RuntimeError(f"tokenizer does not round-trip {text[:40]!r}")
    for i, name in enumerate(SPECIAL_TOKENS):
        ids = tok.encode(f"a{name}b").ids
        if n_regular + i not in ids or tok.encode(name).ids != [n_regular + i]:
            raise RuntimeError(f"{name} is not the single id {n_regular + i}: {ids}")
    if tok.encode("Hello").ids[0] >= n_regular:
        raise RuntimeError("a BOS-like token is being added")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output model directory")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "sparselm-corpus")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="training sequence length")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.1, help="residual dropout (training only)")
    ap.add_argument("--no-autocast", action="store_true", help="train in pure float32")
    ap.add_argument("--vocab", type=int, default=6000, help="tokenizer size incl. 3 specials")
    ap.add_argument("--vocab-pad", type=int, default=64, help="pad embedding rows to a multiple")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=64, help="val windows for periodic evals")
    ap.add_argument("--val-frac", type=float, default=0.05)
    ap.add_argument("--smoke", action="store_true", help="tiny run that checks the pipeline")
    ap.add_argument("--verify-hf", action="store_true", help="compare forward with transformers")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.eval_every, args.log_every, args.eval_windows = 12, 6, 2, 8
        args.verify_hf = True

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.use_deterministic_algorithms(True)

    # ---- corpus
    novels, copyright_text = fetch_corpus(args.cache)
    train_ch, val_ch = split_corpus(novels, args.val_frac, args.seed, val_max_bytes=200_000)
    val_text = "<|endoftext|>".join(val_ch)
    log(
        f"corpus: {len(train_ch)} train chapters ({sum(map(len, train_ch)):,} chars), "
        f"{len(val_ch)} validation chapters ({len(val_text.encode()):,} bytes)"
    )

    # ---- tokenizer
    n_regular = args.vocab - len(SPECIAL_TOKENS)
    tok = train_tokenizer(train_ch, n_regular)
    eos = tok.token_to_id("<|endoftext|>")
    train_ids: list[int] = []
    for ch in train_ch:
        train_ids.extend(tok.encode(ch).ids)
        train_ids.append(eos)  # one document per chapter
    val_ids = tok.encode(val_text).ids
    log(
        f"tokenizer: {tok.get_vocab_size()} tokens; train {len(train_ids):,} tokens, val {len(val_ids):,}"
    )

    # ---- model
    vocab_size = -(-args.vocab // args.vocab_pad) * args.vocab_pad
    cfg = PLMConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate,
    )
    model = PLMForCausalLM(cfg, args.dropout)
    model.init_weights(args.seed)
    n_params = param_count(model)
    log(f"model: {json.dumps(asdict(cfg))}; {n_params:,} parameters")
    if args.verify_hf:
        err = verify_against_transformers(model, args.seed)
        log(f"verify: max relative logit difference vs transformers DeepseekV2 (f64) = {err:.2e}")
        if err > 1e-5:
            raise RuntimeError("forward pass disagrees with transformers")

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    data = torch.tensor(train_ids, dtype=torch.long)
    windows = val_windows(val_ids, args.seq + 1)
    eval_subset = windows[: args.eval_windows]
    gen = torch.Generator().manual_seed(args.seed + 1)
    history = []

    t_train = time.time()
    ema = None
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup, 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s : s + args.seq + 1] for s in starts.tolist()])
        # bf16 autocast (float32 master weights) roughly halves step time on AVX512-BF16 CPUs.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_autocast):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        lv = float(loss.detach())
        ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.time() - t_train
            tps = (step + 1) * args.batch * args.seq / el
            log(
                f"step {step:5d} | loss {lv:.4f} (ema {ema:.4f}) | lr {lr:.2e} | gnorm {gnorm:.2f} | {tps:,.0f} tok/s | {el / 60:.1f} min"
            )
            history.append({"step": step, "train_loss": round(lv, 4)})
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            vl, sp = evaluate(model, eval_subset, 8, sparsity=True)
            log(
                f"step {step:5d} | val loss {vl:.4f} (ppl {math.exp(vl):.2f}, {len(eval_subset)} windows) | relu2 zeros {sum(sp) / len(sp):.1%}"
            )
            history.append({"step": step, "val_loss": round(vl, 4)})
    train_minutes = (time.time() - t_train) / 60
    tokens_trained = args.steps * args.batch * args.seq
    final_train_ema = ema

    # ---- write artifact
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg.hf_dict(bos=eos, eos=eos), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(tok, cfg.max_position_embeddings), indent=2) + "\n"
    )
    (out / "validation.txt").write_text(val_text)
    if (out / "generation_config.json").exists():
        (out / "generation_config.json").unlink()

    # ---- re-read and check everything that shipped; measure on the bf16 weights as f32
    check_tokenizer(out / "tokenizer.json", val_ch[0][:2000], n_regular)
    weights = load_and_check_weights(out / "model.safetensors", cfg)
    cfg_back = json.loads((out / "config.json").read_text())
    shipped = PLMForCausalLM(PLMConfig(**{k: cfg_back[k] for k in asdict(cfg)}))
    shipped.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    from tokenizers import Tokenizer

    tok2 = Tokenizer.from_file(str(out / "tokenizer.json"))
    if tok2.encode((out / "validation.txt").read_text()).ids != val_ids:
        raise RuntimeError("validation.txt does not re-tokenize to the evaluated ids")
    log(f"checked: {len(weights)} tensors bf16 with expected names/shapes; tokenizer round-trips")
    val_loss, per_layer = evaluate(shipped, windows, 8, sparsity=True)
    mean_sp = sum(per_layer) / len(per_layer)
    prompt = "Once upon a time"
    stop = {eos, tok.token_to_id("<|im_end|>")}
    sample_ids = greedy(shipped, tok.encode(prompt).ids, 40, stop)
    sample = tok.decode(sample_ids, skip_special_tokens=False)
    log(
        f"final: val loss {val_loss:.4f}, ppl {math.exp(val_loss):.2f} over {len(windows)} windows of {args.seq + 1}"
    )
    log(f"final: relu2 sparsity mean {mean_sp:.2%}; per layer {[f'{s:.2%}' for s in per_layer]}")
    log(f"sample (greedy, 40 tokens): {prompt!r} -> {sample!r}")

    metrics = {
        "parameters": n_params,
        "tokens_trained": tokens_trained,
        "steps": args.steps,
        "batch_sequences": args.batch,
        "sequence_length": args.seq,
        "train_minutes": round(train_minutes, 1),
        "threads": args.threads,
        "final_train_loss_ema": round(final_train_ema, 4),
        "validation": {
            "file": "validation.txt",
            "tokens": len(val_ids),
            "window_tokens": args.seq + 1,
            "windows": len(windows),
            "predicted_tokens": int(windows[:, 1:].numel()),
            "loss": round(val_loss, 4),
            "perplexity": round(math.exp(val_loss), 3),
            "relu2_sparsity_mean": round(mean_sp, 4),
            "relu2_sparsity_per_layer": [round(s, 4) for s in per_layer],
        },
        "greedy_sample": {
            "prompt": prompt,
            "new_tokens": len(sample_ids),
            "ids": sample_ids,
            "text": sample,
        },
        "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_card(
        out,
        args,
        cfg,
        n_params,
        metrics,
        copyright_text,
        len(train_ids),
        len(train_ch),
        len(val_ch),
    )
    total = sum(f.stat().st_size for f in out.iterdir())
    log(f"wrote {out} ({total / 1e6:.2f} MB) in {(time.time() - t_start) / 60:.1f} min total")
    return 0


def write_card(
    out, args, cfg, n_params, m, copyright_text, n_train_tokens, n_train_ch, n_val_ch
) -> None:
    v = m["validation"]
    per_layer = ", ".join(f"{s:.1%}" for s in v["relu2_sparsity_per_layer"])
    epochs = m["tokens_trained"] / n_train_tokens
    cmd = "nice -n 10 python tools/train_tiny.py --out python/sparselm/models/plm-tiny"
    defaults = argparse.Namespace(steps=1000, batch=16, seq=256, seed=1234, threads=1)
    extra = [
        f"--{k} {getattr(args, k)}"
        for k in vars(defaults)
        if getattr(args, k) != getattr(defaults, k)
    ]
    if extra:
        cmd += " " + " ".join(extra)
    text = f"""---
license: apache-2.0
language: en
library_name: sparselm
tags: [plm, mla, relu2, tiny, test-model]
---

# plm-tiny

A {n_params / 1e6:.1f} M-parameter language model with the exact **PLM** architecture
(`PLMForCausalLM`: multi-head latent attention without q-LoRA, squared-ReLU MLP without gate,
tied embeddings, no biases), trained from scratch on CPU by `tools/train_tiny.py` so that
sparselm has a real, *trained* checkpoint to test and demo offline. It writes Austen-flavoured
English; it knows nothing else and is not an assistant, although its tokenizer carries the
ChatML template of the real PLM-1.8B-Instruct.

## Architecture

| key | value |
|---|---|
| hidden_size | {cfg.hidden_size} |
| num_hidden_layers | {cfg.num_hidden_layers} |
| num_attention_heads | {cfg.num_attention_heads} |
| kv_lora_rank | {cfg.kv_lora_rank} |
| qk_nope_head_dim / qk_rope_head_dim / v_head_dim | {cfg.qk_nope_head_dim} / {cfg.qk_rope_head_dim} / {cfg.v_head_dim} |
| intermediate_size | {cfg.intermediate_size} (hidden_act `relu2`) |
| vocab_size | {cfg.vocab_size} (tokenizer: {args.vocab} tokens; rows {args.vocab}..{cfg.vocab_size - 1} are padding, as in PLM-1.8B) |
| max_position_embeddings | {cfg.max_position_embeddings} |
| rope_theta / rms_norm_eps | {cfg.rope_theta:g} / {cfg.rms_norm_eps:g} |
| parameters | {n_params:,} (embedding/output {cfg.vocab_size * cfg.hidden_size:,}) |
| file | `model.safetensors`, bfloat16, no `lm_head.weight` |

## Tokenizer

Byte-level BPE trained with `tokenizers` on the training split: NFC normalizer, Qwen2's split
regex + ByteLevel pre-tokenizer, ByteLevel decoder, {args.vocab - 3} regular tokens followed by
`<|endoftext|>` = {args.vocab - 3}, `<|im_start|>` = {args.vocab - 2}, `<|im_end|>` = {args.vocab - 1}.
No BOS is added. `eos_token` is `<|endoftext|>` (also config `bos_token_id`/`eos_token_id`); stop on
`<|im_end|>` too when using the chat template. No `generation_config.json`: greedy by default.

## Training data

Jane Austen's six completed novels (*Sense and Sensibility*, *Pride and Prejudice*, *Mansfield
Park*, *Emma*, *Northanger Abbey*, *Persuasion*). The texts are in the public domain (Project
Gutenberg transcriptions); the script takes them from Debian's `{CORPUS_DEB}` package (R data
package by Julia Silge, MIT licence; its copyright file is quoted below), fetched with
`apt-get download` and read without R. Cleaning: lines joined into paragraphs, titles and
chapter/volume headings dropped, `_italics_` underscores removed, whitespace collapsed, NFC.
Each chapter is one document, followed by `<|endoftext|>`.

Split: {n_val_ch} whole chapters (seeded choice, about {args.val_frac:.0%} of the text) are held out as
validation; {n_train_ch} chapters ({n_train_tokens:,} tokens) are used for training.

`validation.txt` is that held-out text, chapters joined by the literal string `<|endoftext|>`
(which the tokenizer encodes as the special token, exactly as in training). It is meant for
offline perplexity and sparsity tests.

## Training

AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak lr {args.lr:g}, {args.warmup} warm-up steps,
cosine decay to 10 %, gradient clipping 1.0, residual dropout {args.dropout:g} (training only; the architecture
has none), {"float32" if args.no_autocast else "bfloat16 autocast with float32 master weights"}, seed {args.seed}, {args.threads} CPU thread(s).
{m["steps"]} steps × {args.batch} sequences × {args.seq} tokens = **{m["tokens_trained"]:,} tokens**
({epochs:.1f} epochs) in **{m["train_minutes"]} minutes** of wall clock.
Final training loss (EMA) **{m["final_train_loss_ema"]:.3f}**. `metrics.json` has the loss curve.

## Evaluation (torch, float32, on the shipped bf16 weights)

Measured by `tools/train_tiny.py` after re-reading the files it wrote:

* `validation.txt` is encoded in one call (`tokenizer.encode(text)`, {v["tokens"]:,} tokens), cut into
  {v["windows"]} non-overlapping windows of {v["window_tokens"]} tokens (the tail is dropped); each window
  predicts its tokens 1..{v["window_tokens"] - 1} from scratch (positions start at 0).
* validation loss **{v["loss"]:.4f}** nats/token, perplexity **{v["perplexity"]:.2f}** over {v["predicted_tokens"]:,} predictions.
* ReLU² activation sparsity (fraction of exact zeros in `relu(up_proj x)²` over the
  intermediate units at every input position of those windows): mean **{v["relu2_sparsity_mean"]:.1%}**; per layer {per_layer}.

Greedy sample, prompt `Once upon a time`, {m["greedy_sample"]["new_tokens"]} new tokens:

> Once upon a time{m["greedy_sample"]["text"]}

## Reproduce

```
{cmd}
```

About an hour on one core (the corpus is fetched with `apt-get`, so run as root). With the same
CPU type, torch version and thread count the result is bit-identical; elsewhere expect close
but different numbers. `--smoke --out /tmp/plm-tiny-smoke` checks the pipeline in a minute.

## Licence

Model weights and tokenizer: Apache-2.0 (same as sparselm). Training text: public domain.
Corpus package copyright (Debian `{CORPUS_DEB}`):

```
{copyright_text.strip()}
```
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
