"""Build (once) a random-weight checkpoint of the exact PLM-1.8B shape, in the Hugging Face
format, for speed benchmarks. Cached outside the repository (default ~/.cache/sparselm/bench).

Weights are seeded normals scaled like a trained model's (std 0.02, norms 1.0); the file is
written tensor by tensor, so peak memory stays at one tensor, and atomically (temp + rename;
an interrupted write leaves no temp file). config.json is written last, also atomically: a
directory with both files is complete.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
from sparselm.testing import PLM_1_8B_CONFIG, tensor_shapes

#: PLM-1.8B's config.json plus the special-token ids of its tokenizer.
PLM_1_8B = dict(PLM_1_8B_CONFIG, bos_token_id=151643, eos_token_id=151645)


def _bf16_bytes(x: np.ndarray) -> bytes:
    b = x.astype(np.float32).view(np.uint32)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return b.tobytes()


def _encode(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "BF16":
        return _bf16_bytes(x)
    if dtype == "F16":
        return x.astype(np.float16).tobytes()
    return x.astype(np.float32).tobytes()


def bench_cache_dir(root: str | None = None) -> Path:
    """Where benchmarks cache what they build: ``root``, else ``$SPARSELM_BENCH_DIR``, else
    ``~/.cache/sparselm/bench`` (never inside the repository)."""
    return Path(
        root or os.environ.get("SPARSELM_BENCH_DIR") or Path.home() / ".cache/sparselm/bench"
    )


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temp file next to it, then a rename (the temp
    file is removed if the write fails). The benches' one way to save a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_checkpoint(root: str | None = None, dtype: str = "BF16", seed: int = 0) -> Path:
    """Return the directory of the cached PLM-1.8B-shaped checkpoint, writing it if absent."""
    base = bench_cache_dir(root)
    out = base / f"plm-1.8b-random-{dtype.lower()}{f'-seed{seed}' if seed else ''}"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    size = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    table = list(tensor_shapes(PLM_1_8B).items())
    for name, shp in table:
        n = int(np.prod(shp)) * size
        header[name] = {"dtype": dtype, "shape": list(shp), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    rng = np.random.default_rng(seed)
    tmp = out / "model.safetensors.tmp"
    try:
        from tqdm import tqdm

        it = tqdm(table, desc="writing PLM-1.8B-shaped checkpoint", unit="tensor")
    except ImportError:  # pragma: no cover
        it = table
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for name, shp in it:
                if len(shp) == 1:
                    x = 1.0 + 0.05 * rng.standard_normal(shp, dtype=np.float32)
                else:
                    x = rng.standard_normal(shp, dtype=np.float32) * np.float32(0.02)
                f.write(_encode(x, dtype))
        os.replace(tmp, out / "model.safetensors")
    except BaseException:  # Ctrl-C, a full disk: no multi-GB temp file left behind
        tmp.unlink(missing_ok=True)
        raise
    write_atomic(
        out / "config.json",
        json.dumps(
            dict(
                PLM_1_8B,
                torch_dtype={"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype],
            ),
            indent=2,
        ),
    )
    return out


if __name__ == "__main__":
    print(ensure_checkpoint())
