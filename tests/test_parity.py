"""Engine parity: sparselm (float32) against the float64 NumPy reference and transformers.

Every test runs on the three shapes of conftest.SHAPES. The metric is
max|Δ| / max|logit| over the whole [positions, vocab] array; the budget is 1e-4 for the float32
engine (measured values are printed: run ``pytest -s tests/test_parity.py``; a JSON summary
line ``[parity-json] {...}`` is printed at the end of the session).

The oracles were validated against each other in test_reference.py (HF vs reference ~1e-7).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    Checkpoint,
    assert_greedy_match,
    hf_greedy,
    hf_greedy_recompute,
    hf_logits,
    reference,
    rel_err,
    stop_ids_of,
    testing,
)

TOL = 1e-4  # float32 engine vs float64 oracles
N_PROMPT = 12
N_DECODE = 20


def _engine_logits(model, ids, vocab: int) -> np.ndarray:
    out = model.logits(ids)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32, type(out)
    assert out.shape == (len(ids), vocab), out.shape
    assert np.isfinite(out).all()
    return out


def _trajectory(ck: Checkpoint) -> tuple[list[int], list[int]]:
    """A prompt and the reference's greedy continuation (fixed ids to decode, whatever the engine
    does), padded with seeded random ids if greedy decoding stops early."""
    prompt = ck.prompt(N_PROMPT, seed=1)
    gen = ck.ref_greedy(prompt, N_DECODE)
    gen = gen + ck.prompt(N_DECODE - len(gen), seed=2)
    return prompt, gen


# ----------------------------------------------------------------------------------------------
# full-prompt logits
# ----------------------------------------------------------------------------------------------


def test_prompt_logits_match_hf_and_reference(
    ckpt: Checkpoint, load_model, hf_models, error_log
) -> None:
    model = load_model(ckpt.path)
    ids = ckpt.prompt(40)
    got = _engine_logits(model, ids, ckpt.vocab)
    err_hf = rel_err(got, hf_logits(hf_models(ckpt), ids))
    err_ref = rel_err(got, ckpt.ref_logits(ids))
    error_log.record(ckpt.name, "engine_vs_hf_prompt", err_hf)
    error_log.record(ckpt.name, "engine_vs_ref_prompt", err_ref)
    assert err_hf <= TOL
    assert err_ref <= TOL


def test_single_token_and_full_context(ckpt: Checkpoint, load_model, error_log) -> None:
    model = load_model(ckpt.path)
    ids = ckpt.prompt(1, seed=5)
    assert rel_err(_engine_logits(model, ids, ckpt.vocab), ckpt.ref_logits(ids)) <= TOL
    ids = ckpt.prompt(ckpt.max_pos, seed=6)  # every position of the context
    err = rel_err(_engine_logits(model, ids, ckpt.vocab), ckpt.ref_logits(ids))
    error_log.record(ckpt.name, "engine_vs_ref_full_context", err)
    assert err <= TOL


def test_threads_do_not_change_results(ckpt: Checkpoint, sl) -> None:
    ids = ckpt.prompt(16, seed=9)
    one = sl.load(ckpt.path, threads=1).logits(ids)
    two = sl.load(ckpt.path, threads=2).logits(ids)
    assert rel_err(one, two) <= 1e-5


# ----------------------------------------------------------------------------------------------
# sessions: KV cache, dense vs absorbed attention
# ----------------------------------------------------------------------------------------------


def test_decode_steps_match_hf(ckpt: Checkpoint, load_model, hf_models, error_log) -> None:
    """Feed the prompt, then one token at a time with absorbed attention; every step's logits
    equal HF's full recomputation of the whole sequence at that position."""
    model = load_model(ckpt.path)
    prompt, gen = _trajectory(ckpt)
    full = hf_logits(hf_models(ckpt), prompt + gen)  # causal: row t == recomputation at step t
    sess = model.session()
    assert sess.n_past == 0
    last = sess.feed(prompt)
    assert last.shape == (ckpt.vocab,) and last.dtype == np.float32
    assert sess.n_past == len(prompt)
    worst = rel_err(last, full[len(prompt) - 1])
    for k, tok in enumerate(gen[:-1]):
        step = sess.feed([tok], attention="absorbed")
        assert sess.n_past == len(prompt) + k + 1
        worst = max(worst, rel_err(step, full[len(prompt) + k]))
    error_log.record(ckpt.name, "engine_decode_absorbed_vs_hf", worst)
    assert worst <= TOL


def test_dense_and_absorbed_attention_agree(ckpt: Checkpoint, load_model, error_log) -> None:
    model = load_model(ckpt.path)
    prompt, gen = _trajectory(ckpt)
    seq = prompt + gen
    # whole prompt at once
    d = model.session().feed(seq, attention="dense", all_logits=True)
    a = model.session().feed(seq, attention="absorbed", all_logits=True)
    assert d.shape == a.shape == (len(seq), ckpt.vocab)
    err = rel_err(a, d)
    # one token at a time
    sd, sa = model.session(), model.session()
    step_d = np.stack([sd.feed([t], attention="dense") for t in seq])
    step_a = np.stack([sa.feed([t], attention="absorbed") for t in seq])
    err = max(err, rel_err(step_a, step_d), rel_err(step_d, d))
    error_log.record(ckpt.name, "engine_dense_vs_absorbed", err)
    assert err <= TOL
    assert rel_err(d, ckpt.ref_logits(seq)) <= TOL


def test_kv_cached_decoding_equals_full_recomputation(
    ckpt: Checkpoint, load_model, error_log
) -> None:
    model = load_model(ckpt.path)
    prompt, gen = _trajectory(ckpt)
    seq = prompt + gen
    full = model.logits(seq)
    # prompt in uneven chunks (dense attention over a non-empty cache), then auto decode
    sess = model.session()
    rows = []
    pos = 0
    for size in (5, 1, 4, len(prompt) - 10):
        chunk = seq[pos : pos + size]
        out = sess.feed(chunk, all_logits=True)
        assert out.shape == (len(chunk), ckpt.vocab)
        rows.append(out)
        pos += size
    for tok in seq[pos:]:
        rows.append(sess.feed([tok])[None, :])
    cached = np.concatenate(rows)
    err = rel_err(cached, full)
    error_log.record(ckpt.name, "engine_cached_vs_full", err)
    assert err <= TOL
    assert sess.n_past == len(seq)
    # reset forgets everything: the same feed gives the same logits again
    sess.reset()
    assert sess.n_past == 0
    again = sess.feed(seq[:7], all_logits=True)
    assert rel_err(again, full[:7]) <= TOL


def test_sessions_are_independent(small_ckpt: Checkpoint, load_model) -> None:
    model = load_model(small_ckpt.path)
    a, b = model.session(), model.session()
    ids = small_ckpt.prompt(10)
    la = a.feed(ids[:6])
    b.feed(small_ckpt.prompt(9, seed=4))
    la2 = a.feed(ids[6:])
    assert a.n_past == 10 and b.n_past == 9
    full = small_ckpt.ref_logits(ids)
    assert rel_err(la, full[5]) <= TOL and rel_err(la2, full[9]) <= TOL


# ----------------------------------------------------------------------------------------------
# greedy generation
# ----------------------------------------------------------------------------------------------


def test_greedy_generation_matches_hf_and_reference(
    ckpt: Checkpoint, load_model, hf_models
) -> None:
    model = load_model(ckpt.path)
    prompt = ckpt.prompt(N_PROMPT, seed=3)
    stops = stop_ids_of(ckpt.path)
    got = model.generate(prompt, max_new_tokens=32, temperature=0)
    assert isinstance(got, list) and all(isinstance(t, int) for t in got)
    want_hf = hf_greedy(hf_models(ckpt), prompt, 32)  # transformers generate(do_sample=False)
    want_ref = ckpt.ref_greedy(prompt, 32)
    assert want_hf == want_ref  # the two oracles agree before we judge the engine
    assert_greedy_match(got, want_ref, stops, 32, what=ckpt.name)


def test_greedy_generation_by_hf_recomputation(
    small_ckpt: Checkpoint, load_model, hf_models
) -> None:
    """An argmax loop over full HF recomputation (no KV cache anywhere) as a third opinion."""
    prompt = small_ckpt.prompt(N_PROMPT, seed=4)
    want = hf_greedy_recompute(hf_models(small_ckpt), prompt, 12)
    assert want == small_ckpt.ref_greedy(prompt, 12)
    got = load_model(small_ckpt.path).generate(prompt, max_new_tokens=12, temperature=0)
    assert_greedy_match(got, want, stop_ids_of(small_ckpt.path), 12, what="hf recompute")


# ----------------------------------------------------------------------------------------------
# file variants: f16 / bf16 storage, dtype conversion on load, shards
# ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("exact_gemm")
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_files(ckpt: Checkpoint, ckpt_root: str, sl, dtype: str, error_log) -> None:
    path = ckpt.variant(ckpt_root, dtype, dtype=dtype)
    rounded = {k: testing.round_to_dtype(v, dtype) for k, v in ckpt.weights.items()}
    ids = ckpt.prompt(24, seed=8)
    want = reference.reference_logits(ckpt.config, rounded, ids)
    for load_dtype in ("auto", "f32"):
        model = sl.load(path, dtype=load_dtype)
        err = rel_err(_engine_logits(model, ids, ckpt.vocab), want)
        error_log.record(ckpt.name, f"engine_{dtype}_file_{load_dtype}_vs_ref", err)
        assert err <= TOL, (dtype, load_dtype)
    # the rounded weights really differ from the float32 ones (the test can tell them apart)
    if dtype == "bf16":
        assert rel_err(want, ckpt.ref_logits(ids)) > 10 * TOL


@pytest.mark.usefixtures("exact_gemm")
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_conversion_on_load_rounds_to_nearest_even(
    ckpt: Checkpoint, sl, dtype: str, error_log
) -> None:
    """load(f32 file, dtype=...) rounds the weight matrices to nearest even. The 1-D RMSNorm
    weights may be rounded too (as a file stored in that dtype has them) or kept in float32:
    either convention is accepted, nothing else (truncation, no conversion) is."""
    ids = ckpt.prompt(16, seed=10)
    got = _engine_logits(sl.load(ckpt.path, dtype=dtype), ids, ckpt.vocab)
    errs = {}
    for label, rounds in (("all", lambda v: True), ("matrices", lambda v: v.ndim == 2)):
        w = {
            k: testing.round_to_dtype(v, dtype) if rounds(v) else v for k, v in ckpt.weights.items()
        }
        errs[label] = rel_err(got, reference.reference_logits(ckpt.config, w, ids))
    error_log.record(ckpt.name, f"engine_load_as_{dtype}_vs_ref", min(errs.values()))
    assert min(errs.values()) <= TOL, errs


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_checkpoint_is_identical(
    ckpt: Checkpoint, ckpt_root: str, sl, load_model, shards: int
) -> None:
    path = ckpt.variant(ckpt_root, f"shards{shards}", dtype="f32", shards=shards)
    ids = ckpt.prompt(20, seed=11)
    single = load_model(ckpt.path).logits(ids)
    sharded = sl.load(path).logits(ids)
    bitwise = bool(np.array_equal(single, sharded))
    print(f"[parity] shape={ckpt.name} shards={shards} bitwise_identical={bitwise}")
    assert rel_err(sharded, single) <= 1e-6


@pytest.mark.usefixtures("exact_gemm")
def test_sharded_bf16_checkpoint(small_ckpt: Checkpoint, ckpt_root: str, sl) -> None:
    path = small_ckpt.variant(ckpt_root, "bf16-shards2", dtype="bf16", shards=2)
    rounded = {k: testing.round_to_dtype(v, "bf16") for k, v in small_ckpt.weights.items()}
    ids = small_ckpt.prompt(12, seed=12)
    want = reference.reference_logits(small_ckpt.config, rounded, ids)
    assert rel_err(sl.load(path).logits(ids), want) <= TOL
