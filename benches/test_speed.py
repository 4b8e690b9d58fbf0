"""pytest-benchmark: end-to-end generation speed on small models.

CI runs these once with ``--benchmark-disable`` (they execute, so they cannot rot, but nothing is
timed there). Timing runs are explicit::

    python -m pytest benches/test_speed.py --benchmark-only

Every result records the kernel tier, thread count and dtype in ``extra_info``. The PLM-1.8B-shape
numbers come from ``benches/bench_e2e.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import sparselm
from sparselm.testing import make_tiny_checkpoint

PROMPT = [int((i * 7919) % 700) + 5 for i in range(64)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = str(tmp_path_factory.mktemp("speed"))
    make_tiny_checkpoint(
        d,
        seed=1,
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=4,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        vocab_size=768,
        num_hidden_layers=4,
        max_position_embeddings=512,
    )
    return d


def _info(benchmark, m: sparselm.Model) -> None:
    benchmark.extra_info.update(
        tier=sparselm.kernel_tier(),
        threads=m.threads,
        dtype=m.dtype,
        commit=subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(__file__),
            check=False,
        ).stdout.strip(),
    )


@pytest.mark.parametrize("dtype", ["f32", "bf16", "q8_0", "q4_0"])
def test_decode(benchmark, model_dir: str, dtype: str) -> None:
    m = sparselm.load(model_dir, dtype=dtype)
    _info(benchmark, m)
    out = benchmark(m.generate, PROMPT[:8], max_new_tokens=32, temperature=0)
    assert len(out) == 32
    benchmark.extra_info["decode_tok_s"] = (m.last_stats or {}).get("decode_tok_s")


def test_prefill(benchmark, model_dir: str) -> None:
    m = sparselm.load(model_dir, dtype="bf16")
    _info(benchmark, m)
    logits = benchmark(m.logits, PROMPT)
    assert logits.shape == (len(PROMPT), m.vocab_size)


def test_bundled_model_generate(benchmark) -> None:
    path = sparselm.bundled_model_path()
    if not (path / "model.safetensors").is_file():
        pytest.skip("the bundled model is not in this build")
    m = sparselm.load()
    _info(benchmark, m)
    text = benchmark(m.generate, "Once upon a time", max_new_tokens=24)
    assert isinstance(text, str) and text


def test_sparse_vs_dense_mlp_child_runs(model_dir: str) -> None:
    """The dense-MLP benchmark switch (SPARSELM_DENSE_MLP=1) gives the same tokens."""
    code = (
        "import sparselm,sys; m=sparselm.load(sys.argv[1]); "
        "print(m.generate(list(range(5, 13)), max_new_tokens=12))"
    )
    outs = [
        subprocess.run(
            [sys.executable, "-c", code, model_dir],
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, SPARSELM_DENSE_MLP=v),
        ).stdout
        for v in ("0", "1")
    ]
    assert outs[0] == outs[1]


def test_llama_table_pools_saved_runs(tmp_path) -> None:
    """``bench_llama.py --table A,B`` pools the rounds of saved runs (no engine is run): the
    same-phase ratios count the runs of both files, and files of different lengths are refused."""
    import json
    from pathlib import Path

    def run(engine: str, sparse: bool | None, tok_s: float, reads: list[float]) -> dict:
        return {
            "engine": engine,
            "sparse": sparse,
            "dtype": "q4_0",
            "threads": 2,
            "prefill_tok_s": 2 * tok_s,
            "decode_tok_s": tok_s,
            "read_gb_s": reads,
            "other_cpu_share": 0.01,
        }

    def saved(name: str, decode: int, scale: float) -> str:
        slow, fast = [33.0, 34.0], [60.0, 61.0]
        rounds = [
            run("llama.cpp", None, 20.0 * scale, slow),
            run("sparselm", True, 24.0 * scale, slow),
            run("sparselm", False, 30.0 * scale, fast),
        ]
        p = tmp_path / name
        p.write_text(json.dumps({"meta": {"prompt": 128, "decode": decode}, "results": rounds}))
        return str(p)

    script = str(Path(__file__).parent / "bench_llama.py")
    a, b = saved("a.json", 64, 1.0), saved("b.json", 64, 1.1)
    out = subprocess.run(
        [sys.executable, script, "--table", f"{a},{b}"], capture_output=True, text=True, check=True
    ).stdout
    row = next(line for line in out.splitlines() if line.startswith("| q4_0 |"))
    # sparse on vs llama.cpp, both slow in both files: 2 runs each, ratio 1.20
    assert "1.20x (2 vs 2) / -" in row, row
    # sparse off ran in the fast phase only, llama.cpp in the slow one: no same-phase pair
    assert row.count("- / -") == 1, row
    assert "medians of 2 alternating rounds" in out
    c = saved("c.json", 32, 1.0)
    bad = subprocess.run(
        [sys.executable, script, "--table", f"{a},{c}"], check=False, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "different prompt/decode lengths" in bad.stderr


def test_llama_phase_rules() -> None:
    """The slow/fast cut of ``bench_llama.py`` ignores a read taken while others used the memory
    (the midpoint of the lowest and highest read would have put it inside the slow phase), one
    phase gives no cut, and a decode that read its weights faster than the reads around it
    allow is not counted as slow-phase."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_llama", Path(__file__).parent / "bench_llama.py"
    )
    assert spec is not None and spec.loader is not None
    bl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bl)

    slow = [{"read_gb_s": [33.0 + i % 3, 32.0 + i % 2]} for i in range(12)]
    fast = [{"read_gb_s": [60.0, 61.0]}, {"read_gb_s": [58.0, 62.0]}]
    disturbed = [{"read_gb_s": [7.0, 33.0]}]
    cut = bl._phases(slow + fast + disturbed)
    assert cut is not None and 40 < cut < 50, cut
    assert bl._phases(slow + disturbed) is None  # one phase (the low read is not a phase)

    def llama(reads: list[float], tok_s: float) -> dict:
        return {"read_gb_s": reads, "gguf_bytes": 1.0e9, "decode_tok_s": tok_s}

    assert bl._phase(llama([33.0, 34.0], 30.0), cut) == "slow"
    assert bl._phase(llama([33.0, 34.0], 40.0), cut) == "mixed"  # 40 GB/s of weights
    assert bl._phase({"read_gb_s": [33.0, 34.0], "gb_s": 45.0}, cut) == "mixed"
    assert bl._phase({"read_gb_s": [33.0, 34.0], "gb_s": 31.0}, cut) == "slow"
    assert bl._phase({"read_gb_s": [60.0, 61.0], "gb_s": 50.0}, cut) == "fast"
    assert bl._phase({"read_gb_s": [33.0, 60.0], "gb_s": 40.0}, cut) == "mixed"
