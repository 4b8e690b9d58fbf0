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


def _bench_llama():
    """benches/bench_llama.py as a module (it needs no llama.cpp until a run starts)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_llama", Path(__file__).parent / "bench_llama.py"
    )
    assert spec is not None and spec.loader is not None
    bl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bl)
    return bl


def test_llama_table_pools_saved_runs(tmp_path) -> None:
    """``bench_llama.py --table A,B`` pools the rounds of saved runs (no engine is run): the
    same-phase ratios count the runs of both files, and files measured under another protocol
    (lengths, threads, model) are refused with exit code 2 and the field named."""
    import json
    from pathlib import Path

    def run(engine: str, sparse: bool | None, tok_s: float, reads: list[float], **kw) -> dict:
        return {
            "engine": engine,
            "sparse": sparse,
            "dtype": "q4_0",
            "threads": kw.get("threads", 2),
            "prefill_tok_s": 2 * tok_s,
            "decode_tok_s": tok_s,
            "read_gb_s": reads,
            "other_cpu_share": 0.01,
        }

    def saved(name: str, decode: int, scale: float, **kw) -> str:
        slow, fast = [33.0, 34.0], [60.0, 61.0]
        rounds = [
            run("llama.cpp", None, 20.0 * scale, slow, **kw),
            run("sparselm", True, 24.0 * scale, slow, **kw),
            run("sparselm", False, 30.0 * scale, fast, **kw),
        ]
        meta = {"prompt": 128, "decode": decode, **kw.get("meta", {})}
        p = tmp_path / name
        p.write_text(json.dumps({"meta": meta, "results": rounds}))
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
    # files saved before the order was recorded: llama.cpp ran first in both rounds
    assert "llama.cpp 2, sparse on 0, sparse off 0; 2 in the fixed order" in out

    def refused(*files: str) -> str:
        bad = subprocess.run(
            [sys.executable, script, "--table", ",".join(files)],
            check=False,
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 2, bad
        return bad.stderr

    # a file with no complete round, or results that are not runs: a message, not a traceback
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"meta": {"prompt": 128, "decode": 64}, "results": []}))
    assert "holds no complete round" in refused(str(empty))
    junk = tmp_path / "junk.json"
    junk.write_text(json.dumps({"meta": {"prompt": 128, "decode": 64}, "results": [1, 2, 3]}))
    assert "a result is not a saved run" in refused(a, str(junk))
    assert "the protocol differs in decode length" in refused(a, saved("c.json", 32, 1.0))
    assert "the protocol differs in threads" in refused(a, saved("d.json", 64, 1.0, threads=1))

    def model(weights: str, hidden: int = 2048) -> dict:
        config = {"hidden_size": hidden, "num_hidden_layers": 24}
        return {"meta": {"model_identity": {"config": config, "weights": weights}}}

    e, f = saved("e.json", 64, 1.0, **model("aa")), saved("f.json", 64, 1.0, **model("bb"))
    assert "the protocol differs in model weights" in refused(e, f)
    g = saved("g.json", 64, 1.0, **model("aa", hidden=1024))
    assert "the protocol differs in model config" in refused(e, g)
    assert "hidden_size" in refused(e, g)
    h = saved("h.json", 64, 1.1, **model("aa"))  # the same model and protocol: pooled
    out = subprocess.run(
        [sys.executable, script, "--table", f"{e},{h}"], capture_output=True, text=True, check=True
    ).stdout
    assert "1.20x (2 vs 2) / -" in out


def test_llama_rotates_the_order_and_names_the_import() -> None:
    """Round r of ``bench_llama.py`` starts with engine r mod 3 (each engine first, second and
    last once in 3 rounds), the table says how often each ran first, and a child's record of
    the sparselm it imported names this process's package and native library."""
    from pathlib import Path

    bl = _bench_llama()
    orders = [bl.round_order(r) for r in range(3)]
    assert orders == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    assert bl.round_order(3) == orders[0]
    runs = []
    for r, order in enumerate(orders):
        got = {e: {"round": r + 1, "run_in_round": pos + 1} for pos, e in enumerate(order)}
        runs.append((got[0], got[1], got[2]))
    assert bl.order_note(runs) == "llama.cpp 1, sparse on 1, sparse off 1"

    ident = bl.imported_sparselm()
    assert Path(ident["module"]) == Path(sparselm.__file__).resolve().parent
    assert len(ident["native_sha256"]) == 16 and ident["kernel_tier"] == sparselm.kernel_tier()
    assert bl.from_repo(ident) == (Path(ident["module"]) == bl.REPO_PACKAGE.resolve())
    if not bl.from_repo(ident):
        assert "WARNING" in bl.not_repo_warning(ident, "abc1234")


def test_llama_phase_rules() -> None:
    """The slow/fast cut of ``bench_llama.py`` ignores a read taken while others used the memory
    (the midpoint of the lowest and highest read would have put it inside the slow phase), one
    phase gives no cut, and a decode that read its weights faster than the reads around it
    allow is not counted as slow-phase."""
    bl = _bench_llama()

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
