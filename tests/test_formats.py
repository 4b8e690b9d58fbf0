"""Weight formats and kernel tiers end to end.

* Every in-memory dtype (f16, bf16, q8_0, q4_0) against the f32 engine on the same checkpoint,
  with a per-format error budget (max|Δ|/max|logit|) and a top-1 agreement floor. The model is
  wide enough (hidden 256) that the block quantizers see realistic rows.
* Every kernel tier this CPU supports, forced through SPARSELM_KERNEL in a child process (the tier
  is chosen once per process), gives the same logits as the fastest tier.
* The bf16 prompt GEMM (AVX512_BF16 CPUs; ``Model.prompt_gemm == "bf16"``) against the float32
  prompt path (``SPARSELM_EXACT_GEMM=1``) on the same weights, with its own budget; short prompts,
  whose down projection runs token by token instead, against both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sparselm
from conftest import rel_err
from sparselm.testing import make_tiny_checkpoint

#: format -> (max relative logit error, min top-1 agreement) vs the f32 engine.
BUDGET = {
    "f16": (2e-3, 0.97),
    "bf16": (2e-2, 0.90),
    "q8_0": (3e-2, 0.85),
    "q4_0": (3.5e-1, 0.50),
}


def _q8_0_roundtrip(w: np.ndarray) -> np.ndarray:
    """GGUF Q8_0 quantize→dequantize of each row (blocks of 32 along the input dim), NumPy."""
    b = w.reshape(-1, 32).astype(np.float32)
    d = np.abs(b).max(axis=1, keepdims=True) / 127.0
    d16 = d.astype(np.float16).astype(np.float32)
    # x · (1/d) in f32, as ggml computes it (x / d can differ in the last bit, and so round the
    # other way at a half)
    inv = np.where(d > 0, np.float32(1.0) / np.where(d > 0, d, 1), 0).astype(np.float32)
    r = b * inv
    q = np.sign(r) * np.floor(np.abs(r) + 0.5)  # round half away from zero, like ggml
    return (q * d16).reshape(w.shape)


def _q4_0_roundtrip(w: np.ndarray) -> np.ndarray:
    """GGUF Q4_0 quantize→dequantize: d = max/-8 (max = the signed value of largest |x|)."""
    b = w.reshape(-1, 32).astype(np.float32)
    idx = np.abs(b).argmax(axis=1)
    mx = b[np.arange(len(b)), idx][:, None]
    d = mx / -8.0
    inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0.0)
    q = np.minimum(15, np.trunc(b * inv + 8.5)).astype(np.int32)
    d16 = d.astype(np.float16).astype(np.float32)
    return ((q - 8) * d16).reshape(w.shape)


@pytest.mark.usefixtures("exact_gemm")
@pytest.mark.parametrize("layout", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_engine_matches_reference_on_rounded_weights(
    dtype: str, layout: str, wide_model: str, prompt: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quantized engine equals the NumPy float64 reference run on the same block-rounded
    weights. The f32 prompt forward widens quantized rows to f32 (no activation quantization),
    so the only difference left is f32 vs f64 arithmetic. down_proj is quantized along hidden
    (rows of W_downᵀ) by default, along its inputs with the dense MLP (SPARSELM_DENSE_MLP=1)."""
    from sparselm.reference import load_weights, reference_logits

    monkeypatch.setenv("SPARSELM_DENSE_MLP", "1" if layout == "dense" else "0")
    cfg, w = load_weights(wide_model)
    rt = _q8_0_roundtrip if dtype == "q8_0" else _q4_0_roundtrip
    wq = {}
    for name, v in w.items():
        if v.ndim == 2:
            along_hidden = layout == "sparse" and name.endswith("down_proj.weight")
            wq[name] = rt(v.T).T if along_hidden else rt(v)
        else:
            wq[name] = v
    want = reference_logits(cfg, wq, prompt)
    got = sparselm.load(wide_model, dtype=dtype).logits(prompt)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"[formats] {dtype} ({layout} MLP) vs reference on rounded weights: {err:.2e}")
    assert err <= 1e-5, f"{dtype}: {err:.3e}"


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = str(tmp_path_factory.mktemp("wide"))
    make_tiny_checkpoint(
        d,
        seed=3,
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=4,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        vocab_size=768,
        num_hidden_layers=2,
        max_position_embeddings=256,
    )
    return d


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    rng = np.random.default_rng(0)
    return [int(t) for t in rng.integers(0, 700, size=48)]


@pytest.fixture(scope="module")
def f32_logits(wide_model: str, prompt: list[int]) -> np.ndarray:
    return sparselm.load(wide_model, dtype="f32").logits(prompt)


@pytest.mark.usefixtures("exact_gemm")
@pytest.mark.parametrize("layout", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", sorted(BUDGET))
def test_dtype_against_f32(
    dtype: str,
    layout: str,
    wide_model: str,
    prompt: list[int],
    f32_logits: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPARSELM_DENSE_MLP", "1" if layout == "dense" else "0")
    m = sparselm.load(wide_model, dtype=dtype)
    assert m.prompt_gemm == "f32"
    assert m.dtype == dtype
    got = m.logits(prompt)
    err = float(np.abs(got - f32_logits).max() / np.abs(f32_logits).max())
    agree = float((got.argmax(-1) == f32_logits.argmax(-1)).mean())
    print(f"[formats] {dtype} ({layout} MLP): rel err {err:.2e}, top-1 agreement {agree:.3f}")
    max_err, min_agree = BUDGET[dtype]
    assert err <= max_err, f"{dtype}: relative logit error {err:.3e} > {max_err}"
    assert agree >= min_agree, f"{dtype}: top-1 agreement {agree:.3f} < {min_agree}"


@pytest.mark.usefixtures("exact_gemm")
@pytest.mark.parametrize("layout", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "bf16"])
def test_cached_decode_matches_full_forward(
    dtype: str, layout: str, wide_model: str, prompt: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Absorbed decode over the latent cache equals the full-prompt forward at every step, with
    the sparse MLP and with the dense one (W_down in the GEMV layout)."""
    monkeypatch.setenv("SPARSELM_DENSE_MLP", "1" if layout == "dense" else "0")
    m = sparselm.load(wide_model, dtype=dtype)
    full = m.logits(prompt)
    s = m.session()
    s.feed(prompt[:8], attention="dense")
    scale = float(np.abs(full).max())
    for i in range(8, len(prompt)):
        step = s.feed([prompt[i]], attention="absorbed")
        # Quantized GEMVs quantize their input per call; prefill widens weights to f32, so the
        # two paths differ by the activation quantization only.
        tol = 2e-5 if dtype == "bf16" else 3e-2
        assert float(np.abs(step - full[i]).max()) / scale <= tol, (dtype, i)


def test_unknown_dtype_is_rejected(wide_model: str) -> None:
    with pytest.raises((sparselm.DtypeError, sparselm.InvalidArgumentError)):
        sparselm.load(wide_model, dtype="q3_k")


_CHILD = """
import json, sys
import numpy as np
import sparselm
m = sparselm.load(sys.argv[1], dtype=sys.argv[2])
print(json.dumps({"tier": sparselm.kernel_tier(),
                  "logits": m.logits([int(t) for t in sys.argv[3].split(",")]).tolist()}))
"""


def _tiers() -> list[str]:
    from sparselm import _native  # noqa: F401

    cpuinfo = "/proc/cpuinfo"
    flags = Path(cpuinfo).read_text() if os.path.exists(cpuinfo) else ""
    tiers = ["scalar"]
    if " avx2 " in flags and " fma " in flags and " f16c " in flags:
        tiers.append("avx2")
        if " avx512f " in flags:
            tiers.append("avx512")
    return tiers


def _run_child(script: str, model: str, dtype: str, ids: list[int], env: dict[str, str]) -> Any:
    """Run ``script`` in a fresh interpreter with ``env`` (the engine reads its environment
    variables once per process) on ``model``, ``dtype`` and the token ids; the JSON of its last
    output line."""
    r = subprocess.run(
        [sys.executable, "-c", script, model, dtype, ",".join(map(str, ids))],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


#: Decode logits of tokens 4..12 fed one at a time after the first 4, and the down layout.
_DECODE_CHILD = """
import json, sys
import sparselm
m = sparselm.load(sys.argv[1], dtype=sys.argv[2])
s = m.session()
ids = [int(t) for t in sys.argv[3].split(",")]
s.feed(ids[:4])
out = [s.feed([t]).tolist() for t in ids[4:12]]
print(json.dumps({"layout": sparselm.down_layout(), "logits": out}))
"""


@pytest.mark.parametrize("dtype", ["f32", "bf16", "q8_0", "q4_0"])
def test_every_tier_via_env_override(dtype: str, wide_model: str, prompt: list[int]) -> None:
    out = {}
    for tier in _tiers():
        # f32 prompt products on every tier: the bf16 GEMM exists only on avx512 + BF16 CPUs
        # and has its own test below.
        env = dict(os.environ, SPARSELM_KERNEL=tier, SPARSELM_EXACT_GEMM="1")
        res = _run_child(_CHILD, wide_model, dtype, prompt[:16], env)
        assert res["tier"] == tier, f"SPARSELM_KERNEL={tier} selected {res['tier']}"
        out[tier] = np.asarray(res["logits"])
    base = out["scalar"]
    for tier, got in out.items():
        err = float(np.abs(got - base).max() / np.abs(base).max())
        assert err <= 1e-4, f"{dtype}: tier {tier} differs from scalar by {err:.2e}"


_ENGINE_CHILD = """
import json, sys
import sparselm
m = sparselm.load(sys.argv[1], dtype=sys.argv[2])
print(json.dumps({"engine": sparselm.prompt_engine(), "gemm": m.prompt_gemm,
                  "logits": m.logits([int(t) for t in sys.argv[3].split(",")]).tolist()}))
"""


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_amx_and_avx512_prompt_gemms_agree(dtype: str, wide_model: str, prompt: list[int]) -> None:
    """AMX tiles (where the CPU has AMX-BF16) and AVX512_BF16 run the same bf16 prompt GEMM;
    ``SPARSELM_AMX=0`` selects AVX-512. Their float32 sums run in another order; most are exact
    (bf16 products have 16 significant bits), so most logits come out bit-identical, and where
    a sum differs in its last bit it can move a later bf16 rounding by one step (2^-8
    relative). So the two agree far inside the bf16 GEMM's budget, not bit for bit."""
    out = {}
    for amx in ("1", "0"):
        env = dict(os.environ, SPARSELM_AMX=amx)
        out[amx] = _run_child(_ENGINE_CHILD, wide_model, dtype, prompt, env)
    if out["0"]["gemm"] != "bf16":
        pytest.skip("this CPU has no AVX512_BF16: no bf16 prompt GEMM to compare")
    cpuinfo = Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
    assert out["0"]["engine"] == "avx512-bf16"
    if "amx_bf16" not in cpuinfo.split() or out["1"]["engine"] != "amx-bf16":
        # no AMX-BF16 listed, or a kernel that refuses the tile state: AVX-512 runs instead
        assert out["1"]["engine"] == "avx512-bf16"
        pytest.skip("AMX-BF16 tiles are not usable here: only the AVX-512 engine runs")
    assert out["1"]["engine"] == "amx-bf16"
    got, want = np.asarray(out["1"]["logits"]), np.asarray(out["0"]["logits"])
    err = float(np.abs(got - want).max() / np.abs(want).max())
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    print(f"[formats] {dtype} prompt logits, AMX vs AVX-512: rel err {err:.2e}, top-1 {agree:.3f}")
    assert err <= FAST_BUDGET[dtype][0] / 4, err
    assert agree >= 0.95, agree


@pytest.mark.parametrize("dtype", ["f16", "q4_0"])
def test_software_prefetch_changes_no_result(
    dtype: str, wide_model: str, prompt: list[int]
) -> None:
    """``SPARSELM_PREFETCH`` (software prefetch distance of the decode GEMVs, bytes) only moves
    data into cache: decode logits are bit-identical with it off, at the default and at an
    odd distance."""
    outs = []
    for pf in ("0", None, "192"):
        env = dict(os.environ)
        env.pop("SPARSELM_PREFETCH", None)
        if pf is not None:
            env["SPARSELM_PREFETCH"] = pf
        res = _run_child(_DECODE_CHILD, wide_model, dtype, prompt, env)
        outs.append(np.asarray(res["logits"]))
    assert outs[0].shape == (8, 768)
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_both_down_layouts_decode_within_budget(
    dtype: str, wide_model: str, prompt: list[int]
) -> None:
    """``SPARSELM_DOWN_LAYOUT=rows|groups`` picks how quantized ``W_downᵀ`` is stored and read
    in decode (whole-row pieces and only active rows read, or 128-byte pieces and busy
    groups read whole). The two group the int8 coefficients of the down kernel differently, so
    they agree to rounding, not bit for bit: both decode the same tokens within the format's
    budget of the float32 model, and each reports the layout it runs."""
    out = {}
    for dt, layout in ((dtype, "rows"), (dtype, "groups"), ("f32", "rows")):
        env = dict(os.environ, SPARSELM_DOWN_LAYOUT=layout)
        out[dt, layout] = _run_child(_DECODE_CHILD, wide_model, dt, prompt, env)
    if out[dtype, "rows"]["layout"] == "none":
        pytest.skip("this CPU has no planar down kernel (AVX-512 VNNI + VBMI): one path only")
    assert out[dtype, "rows"]["layout"] == "rows"
    assert out[dtype, "groups"]["layout"] == "groups"
    want = np.asarray(out["f32", "rows"]["logits"])
    assert want.shape == (8, 768)
    budget, min_agree = BUDGET[dtype]
    for layout in ("rows", "groups"):
        got = np.asarray(out[dtype, layout]["logits"])
        err = rel_err(got, want)
        agree = float((got.argmax(-1) == want.argmax(-1)).mean())
        print(f"[formats] {dtype} decode, down layout {layout}: rel err {err:.2e}, top-1 {agree}")
        assert err <= budget, (layout, err)
        assert agree >= min_agree, (layout, agree)
    # against each other: far closer than either is to float32
    rows, groups = (np.asarray(out[dtype, k]["logits"]) for k in ("rows", "groups"))
    assert rel_err(rows, groups) <= budget / 2


#: format -> (max relative logit error, min top-1 agreement) of the bf16 prompt GEMM vs the
#: f32 prompt path on the same stored weights. bf16 keeps 8 significant bits: one rounding of
#: each weight and activation per product, sums in f32.
FAST_BUDGET = {
    "f16": (2e-2, 0.90),
    "bf16": (2e-2, 0.90),
    "q8_0": (2e-2, 0.90),
    "q4_0": (2e-2, 0.90),
}


def _fast_gemm_or_skip(m: sparselm.Model) -> None:
    if m.prompt_gemm != "bf16":
        pytest.skip("this CPU has no AVX512_BF16: the bf16 prompt GEMM is not used here")


@pytest.mark.parametrize("dtype", sorted(FAST_BUDGET))
def test_bf16_prompt_gemm_against_f32_prompt_path(
    dtype: str, wide_model: str, prompt: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = sparselm.load(wide_model, dtype=dtype)
    _fast_gemm_or_skip(fast)
    monkeypatch.setenv("SPARSELM_EXACT_GEMM", "1")
    exact = sparselm.load(wide_model, dtype=dtype)
    assert exact.prompt_gemm == "f32"
    got, want = fast.logits(prompt), exact.logits(prompt)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    print(f"[formats] bf16 prompt GEMM, {dtype}: rel err {err:.2e}, top-1 agreement {agree:.3f}")
    max_err, min_agree = FAST_BUDGET[dtype]
    assert 0 < err <= max_err, f"{dtype}: {err:.3e}"
    assert agree >= min_agree, f"{dtype}: top-1 agreement {agree:.3f}"


_INT8_CHILD = """
import json, sys
import sparselm
m = sparselm.load(sys.argv[1], dtype=sys.argv[2])
print(json.dumps({"tier": sparselm.kernel_tier(), "gemm": m.prompt_gemm,
                  "logits": m.logits([int(t) for t in sys.argv[3].split(",")]).tolist()}))
"""


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "bf16"])
def test_avx2_int8_prompt_gemm(
    dtype: str, wide_model: str, prompt: list[int], f32_logits: np.ndarray
) -> None:
    """Without AVX512_BF16 (here: the AVX2 tier forced), the Q8_0/Q4_0 projections of a prompt
    are int8 GEMMs on Q8_0-quantized inputs (decoding's own kernels; ``prompt_gemm == "int8"``),
    the rest stays f32; ``SPARSELM_EXACT_GEMM=1`` makes every product f32. Both stay within
    the format's budget of the float32 model, and differ from each other by about the Q8_0
    rounding of the inputs (bf16 weights have no int8 path: "f32" either way).
    ``SPARSELM_INTERLEAVE=0`` (no 16-row layout) gives the exact path's bits."""
    if "avx2" not in _tiers():
        pytest.skip("this CPU has no AVX2 tier")
    out = {}
    for key, extra in (
        ("0", {"SPARSELM_EXACT_GEMM": "0"}),
        ("1", {"SPARSELM_EXACT_GEMM": "1"}),
        ("plain", {"SPARSELM_INTERLEAVE": "0"}),
    ):
        env = dict(os.environ, SPARSELM_KERNEL="avx2", **extra)
        out[key] = _run_child(_INT8_CHILD, wide_model, dtype, prompt, env)
        assert out[key]["tier"] == "avx2"
    assert out["1"]["gemm"] == out["plain"]["gemm"] == "f32"
    fast, exact = np.asarray(out["0"]["logits"]), np.asarray(out["1"]["logits"])
    # SPARSELM_INTERLEAVE=0 keeps the GGUF row order (no 16-row kernels, so no int8 GEMM): its
    # f32 prompt path widens the same weights as the exact path of interleaved matrices.
    assert np.array_equal(np.asarray(out["plain"]["logits"]), exact)
    if dtype == "bf16":
        assert out["0"]["gemm"] == "f32"
        assert np.array_equal(fast, exact)
        return
    assert out["0"]["gemm"] == "int8"
    between = rel_err(fast, exact)
    budget, min_agree = BUDGET[dtype]
    err = rel_err(fast, f32_logits)
    agree = float((fast.argmax(-1) == f32_logits.argmax(-1)).mean())
    print(f"[formats] {dtype} avx2 int8 prompt: vs f32 path {between:.2e}, vs f32 model {err:.2e}")
    assert 0 < between <= FAST_BUDGET[dtype][0], between
    assert err <= budget, err
    assert agree >= min_agree, agree


#: Prompts up to this length run the down projection token by token on decode's path instead
#: of the bf16 GEMM (rust/core/src/model.rs, DOWN_PER_TOKEN_MAX).
SHORT_PROMPT_MAX = 16


@pytest.mark.parametrize("dtype", sorted(FAST_BUDGET))
def test_short_prompts_take_the_token_path_within_budget(
    dtype: str, wide_model: str, prompt: list[int], f32_logits: np.ndarray
) -> None:
    m = sparselm.load(wide_model, dtype=dtype)
    _fast_gemm_or_skip(m)
    long = m.logits(prompt)  # 48 tokens: the GEMM path
    scale = float(np.abs(f32_logits).max())
    # One past the limit the prompt is a GEMM again: causal rows equal the long prompt's bits.
    n = SHORT_PROMPT_MAX + 1
    assert np.array_equal(m.logits(prompt[:n]), long[:n])
    max_err = BUDGET[dtype][0] + FAST_BUDGET[dtype][0]
    for n in (2, SHORT_PROMPT_MAX):
        got = m.logits(prompt[:n])
        gemm = float(np.abs(got - long[:n]).max()) / scale
        err = float(np.abs(got - f32_logits[:n]).max()) / scale
        print(f"[formats] {dtype} {n}-token prompt: vs GEMM rows {gemm:.2e}, vs f32 {err:.2e}")
        # another path (so not the same bits), as close to the GEMM as the GEMM is to f32
        assert 0 < gemm <= FAST_BUDGET[dtype][0], (n, gemm)
        assert err <= max_err, (n, err)


def test_bf16_prompt_gemm_never_applies_to_f32(
    wide_model: str, prompt: list[int], f32_logits: np.ndarray
) -> None:
    m = sparselm.load(wide_model, dtype="f32")
    assert m.prompt_gemm == "f32"
    assert np.array_equal(m.logits(prompt), f32_logits)


@pytest.mark.parametrize("dtype", ["bf16", "q8_0"])
def test_bf16_prompt_then_decode_tracks_full_forward(
    dtype: str, wide_model: str, prompt: list[int]
) -> None:
    """A cache filled by the bf16 prompt GEMM feeds absorbed decode steps that stay close to the
    full forward of the same model, and greedy continuations agree."""
    m = sparselm.load(wide_model, dtype=dtype)
    _fast_gemm_or_skip(m)
    full = m.logits(prompt)
    s = m.session()
    s.feed(prompt[:8])
    scale = float(np.abs(full).max())
    errs = []
    for i in range(8, len(prompt)):
        step = s.feed([prompt[i]])
        errs.append(float(np.abs(step - full[i]).max()) / scale)
    print(f"[formats] bf16 prompt + decode, {dtype}: max rel err {max(errs):.2e}")
    assert max(errs) <= 4e-2, (dtype, max(errs))


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "f16"])
def test_sparse_decode_equals_dense_decode(
    dtype: str, wide_model: str, prompt: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Skipping the zero ReLU² neurons in decode changes the result only by rounding: the float
    engines sum the same rows in another order; the quantized engines' int8 down kernel may
    group the active rows differently from the all-neurons pass (each group quantizes its
    coefficients with its own scale): measured 1.2e-2 / 1.4e-2 (q8_0 / q4_0), the size of the
    activation quantization every quantized GEMV already has, so the budget is that of
    test_cached_decode_matches_full_forward. Both on the same W_downᵀ (the all-neurons pass is
    ``SPARSELM_DENSE_MLP=rows``)."""

    def decode(dense: bool) -> np.ndarray:
        monkeypatch.setenv("SPARSELM_DENSE_MLP", "rows" if dense else "0")
        s = sparselm.load(wide_model, dtype=dtype, threads=1).session()
        s.feed(prompt[:4])
        return np.stack([s.feed([t], attention="absorbed") for t in prompt[4:12]])

    sparse, dense = decode(False), decode(True)
    err = float(np.abs(sparse - dense).max() / np.abs(dense).max())
    print(f"[formats] sparse vs dense decode, {dtype}: rel err {err:.2e}")
    assert err <= (1e-5 if dtype == "f16" else 3e-2), (dtype, err)
    assert (sparse.argmax(-1) == dense.argmax(-1)).mean() >= 0.85


@pytest.fixture(scope="module")
def blocks_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An MLP 4160 neurons wide: the dense float W_down is cut into column blocks of 2048
    (``DOWN_COL_BLOCK``), so it has two whole blocks and a 64-wide one."""
    d = str(tmp_path_factory.mktemp("blocks"))
    make_tiny_checkpoint(
        d,
        seed=5,
        hidden_size=64,
        intermediate_size=4160,
        num_attention_heads=2,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        vocab_size=300,
        num_hidden_layers=2,
        max_position_embeddings=64,
    )
    return d


@pytest.mark.usefixtures("exact_gemm")
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_dense_float_mlp_in_column_blocks(
    dtype: str, blocks_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dense float MLP (``SPARSELM_DENSE_MLP=1``: W_down in column blocks, one GEMV or GEMM
    per block, summed) gives the sparse engine's logits, in the prompt forward and in decode
    on the latent cache, and the prompt logits equal the NumPy reference on f32 weights."""
    from sparselm.reference import load_weights, reference_logits

    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 300, size=12)]

    def run(mode: str) -> tuple[np.ndarray, np.ndarray]:
        monkeypatch.setenv("SPARSELM_DENSE_MLP", mode)
        m = sparselm.load(blocks_model, dtype=dtype, threads=2)
        full = m.logits(prompt)
        s = m.session()
        s.feed(prompt[:6])
        return full, np.stack([s.feed([t], attention="absorbed") for t in prompt[6:]])

    (full_d, dec_d), (full_s, dec_s) = run("1"), run("0")
    scale = float(np.abs(full_s).max())
    tol = {"f32": 1e-5, "f16": 1e-3, "bf16": 1e-2}[dtype]
    assert float(np.abs(full_d - full_s).max()) / scale <= 1e-5
    assert float(np.abs(dec_d - dec_s).max()) / scale <= 1e-5
    assert float(np.abs(dec_d - full_d[6:]).max()) / scale <= max(tol, 1e-4)
    if dtype == "f32":
        cfg, w = load_weights(blocks_model)
        want = reference_logits(cfg, w, prompt)
        assert float(np.abs(full_d - want).max() / np.abs(want).max()) <= 1e-5


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_dense_float_mlp_in_column_blocks_bf16_gemm(
    dtype: str, blocks_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with the default bf16 prompt GEMM, which the column blocks go through one by
    one: the dense prompt logits stay within that GEMM's budget of the exact f32 prompt path,
    as the sparse engine's do."""
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, 300, size=16)]
    monkeypatch.setenv("SPARSELM_EXACT_GEMM", "1")
    monkeypatch.setenv("SPARSELM_DENSE_MLP", "0")
    exact = sparselm.load(blocks_model, dtype=dtype).logits(prompt)
    monkeypatch.delenv("SPARSELM_EXACT_GEMM")
    scale = float(np.abs(exact).max())
    max_err, min_agree = FAST_BUDGET[dtype]
    for mode in ("1", "0"):
        monkeypatch.setenv("SPARSELM_DENSE_MLP", mode)
        m = sparselm.load(blocks_model, dtype=dtype)
        _fast_gemm_or_skip(m)
        got = m.logits(prompt)
        err = float(np.abs(got - exact).max()) / scale
        agree = float((got.argmax(-1) == exact.argmax(-1)).mean())
        print(
            f"[formats] {dtype} bf16 GEMM, dense MLP={mode}: rel err {err:.2e}, top-1 {agree:.3f}"
        )
        assert 0 < err <= max_err, (mode, err)
        assert agree >= min_agree, (mode, agree)


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_decode_does_not_depend_on_threads(
    dtype: str, wide_model: str, prompt: list[int]
) -> None:
    """The int8 down kernel's calls are planned from the active neurons alone, so one or two
    threads differ only in the order partial sums are added."""

    def decode(threads: int) -> np.ndarray:
        s = sparselm.load(wide_model, dtype=dtype, threads=threads).session()
        s.feed(prompt[:4])
        return np.stack([s.feed([t], attention="absorbed") for t in prompt[4:12]])

    one, two = decode(1), decode(2)
    err = float(np.abs(one - two).max() / np.abs(one).max())
    assert err <= 1e-5, (dtype, err)


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_load_with_intermediate_not_multiple_of_32(dtype: str, tmp_path: Path) -> None:
    """80 neurons cannot be cut into 32-value blocks: the matrices with 80-wide rows stay f32
    while the others are quantized, and prompt and decode still track f32."""
    d = make_tiny_checkpoint(
        tmp_path / "m",
        seed=9,
        hidden_size=64,
        intermediate_size=80,
        num_attention_heads=2,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        kv_lora_rank=32,
        vocab_size=300,
        num_hidden_layers=2,
        max_position_embeddings=64,
    )
    ids = [1, 5, 9, 200, 33, 7, 150, 2]
    want = sparselm.load(d, dtype="f32").logits(ids)
    m = sparselm.load(d, dtype=dtype)
    assert m.dtype == dtype
    got = m.logits(ids)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err <= BUDGET[dtype][0], (dtype, err)
    s = m.session()
    s.feed(ids[:4])
    for t in ids[4:]:
        step = s.feed([t])
    assert float(np.abs(step - want[-1]).max() / np.abs(want).max()) <= BUDGET[dtype][0]


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_load_that_keeps_every_matrix_f32_is_exact(dtype: str, tmp_path: Path) -> None:
    """No width is a multiple of 32, so a quantized load keeps every matrix in f32: its prompts
    must then take the f32 path too (they were rounded to bf16, 1e-2 off the f32 model)."""
    d = make_tiny_checkpoint(
        tmp_path / "m",
        seed=3,
        hidden_size=72,
        intermediate_size=200,
        num_attention_heads=3,
        qk_nope_head_dim=12,
        qk_rope_head_dim=6,
        v_head_dim=20,
        kv_lora_rank=24,
        vocab_size=301,
        num_hidden_layers=2,
        max_position_embeddings=64,
    )
    ids = [(7 * i + 3) % 301 for i in range(40)]
    f32 = sparselm.load(d, dtype="f32")
    m = sparselm.load(d, dtype=dtype)
    assert m.prompt_gemm == f32.prompt_gemm == "f32"
    want, got = f32.logits(ids), m.logits(ids)
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-5


def test_default_threads_is_one_per_physical_core(wide_model: str) -> None:
    """``threads=None`` runs one thread per physical core this process may use: within
    1..os.cpu_count(), equal to the distinct sibling sets of the allowed CPUs where Linux
    says (an independent reading of sysfs here), capped by a cgroup CPU quota if there is
    one, and what a model loaded without ``threads`` reports."""
    n = sparselm.default_threads()
    assert isinstance(n, int) and 1 <= n <= (os.cpu_count() or 1)
    topo = Path("/sys/devices/system/cpu")
    if hasattr(os, "sched_getaffinity") and (topo / "cpu0/topology").is_dir():
        cores = set()
        for cpu in os.sched_getaffinity(0):
            d = topo / f"cpu{cpu}/topology"
            f = (
                d / "core_cpus_list"
                if (d / "core_cpus_list").exists()
                else d / "thread_siblings_list"
            )
            cores.add(f.read_text().strip())
        want = min(len(cores), len(os.sched_getaffinity(0)))
        quota = _cgroup_cpu_quota()
        if quota is not None:
            want = min(want, quota)
        assert n == want
    assert sparselm.load(wide_model).threads == n


def _cgroup_cpu_quota() -> int | None:
    """The CPU quota of this process's cgroups rounded up to whole CPUs (the cap Rust's
    ``available_parallelism``, and so ``default_threads``, applies), or None without one:
    cgroup v2 ``cpu.max`` of the process's group and its ancestors, cgroup v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of its ``cpu`` group (the smallest found)."""
    import math

    root = Path("/sys/fs/cgroup")
    limits: list[int] = []

    def add(quota: str, period: str) -> None:
        if quota not in ("max", "-1") and int(quota) > 0 and int(period) > 0:
            limits.append(max(1, math.ceil(int(quota) / int(period))))

    try:
        groups = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in groups:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # v2: the group and every ancestor
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            d = base / rel
            while True:
                f = d / "cpu.max"
                if f.is_file():
                    add(*f.read_text().split()[:2])
                if d == base:
                    break
                d = d.parent
        elif "cpu" in controllers.split(","):  # v1
            d = root / "cpu" / rel
            q, per = d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us"
            if q.is_file() and per.is_file():
                add(q.read_text().strip(), per.read_text().strip())
    return min(limits) if limits else None


def test_memory_bandwidth_measures_and_rejects_bad_arguments() -> None:
    """The read-bandwidth probe the benchmarks pair their timings with (no timing asserted:
    only that it measures something and validates its arguments on both sides)."""
    from sparselm import _native

    gb_s = sparselm.memory_bandwidth(threads=2, mib=16, passes=2)
    assert np.isfinite(gb_s) and gb_s > 0
    assert len(_native.read_bandwidth(1, 8, 3)) == 3
    for bad in ({"threads": 0}, {"mib": 0}, {"passes": -1}, {"threads": 1.5}, {"mib": True}):
        with pytest.raises(sparselm.InvalidArgumentError):
            sparselm.memory_bandwidth(**bad)
    # the native layer checks too (and never crashes)
    with pytest.raises(sparselm.InvalidArgumentError):
        _native.read_bandwidth(0, 8, 1)
    with pytest.raises(sparselm.InvalidArgumentError):
        _native.read_bandwidth(1, 8, 0)
