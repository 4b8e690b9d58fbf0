"""Build (once) a random-weight checkpoint of the exact PLM-1.8B shape, in the Hugging Face
format, for speed benchmarks. Cached outside the repository (default ~/.cache/sparselm/bench).

Weights are seeded normals scaled like a trained model's (std 0.02, norms 1.0); the file is
written tensor by tensor, so peak memory stays at one tensor, and atomically (temp + rename;
an interrupted write leaves no temp file). config.json is written last, also atomically: a
directory with both files is complete.

Also the benches' shared file helpers: ``write_atomic`` (their one way to save a file) and
``model_identity`` (what a saved result ran on, checked before results are pooled).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

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


#: Bytes of each safetensors file's data hashed by ``model_identity`` at its start and at its end.
SAMPLE_BYTES = 1 << 20


def model_identity(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What a benchmark ran on, cheaply enough for multi-GB checkpoints: ``config`` (config.json
    as a dict: the shape, the source dtype) and ``weights``, a SHA-256 of every safetensors file's
    name, size and header (tensor names, dtypes, shapes) and of the first and last
    ``SAMPLE_BYTES`` of its data. Two checkpoints with the same identity have the same shape and
    almost surely the same weights (seeded random weights differ in every sampled byte); the
    directory they sit in does not matter. ``--table`` refuses to pool runs whose identities
    differ."""
    d = Path(model_dir)
    config = json.loads((d / "config.json").read_text())
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}:".encode())
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h.update(fh.read(n))  # the header: names, dtypes, shapes, offsets
            data = 8 + n
            h.update(fh.read(SAMPLE_BYTES))
            fh.seek(max(data, size - SAMPLE_BYTES))
            h.update(fh.read(SAMPLE_BYTES))
    return {"config": config, "weights": h.hexdigest()[:16]}


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


def main(argv: list[str] | None = None) -> None:
    """Command line: write the checkpoint if absent and print its directory."""
    import argparse

    ap = argparse.ArgumentParser(
        description="Write (once) the random-weight PLM-1.8B-shaped checkpoint the benchmarks "
        "use and print its directory (~3.6 GB in bf16)."
    )
    ap.add_argument("--root", help="cache directory (default ~/.cache/sparselm/bench)")
    ap.add_argument("--dtype", default="BF16", choices=["BF16", "F16", "F32"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(ensure_checkpoint(a.root, a.dtype, a.seed))


if __name__ == "__main__":
    main()
