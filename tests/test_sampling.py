"""Sampling, stopping and streaming semantics of Model.generate / Model.chat.

Greedy expectations come from the float64 reference (so a wrong engine cannot agree with
itself). Sampling is checked through its invariants (seeded determinism, filters that collapse
to greedy, the support and frequencies of top-k sampling) rather than exact random streams.
The UTF-8 streaming test uses a hand-built model (`testing.cycle_weights`) whose greedy output
is a fixed cycle of single-byte tokens spelling "你😀", so every character is split over 3-4
tokens.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import Checkpoint, assert_greedy_match, reference, stop_ids_of, testing

N_SEEDS = 8


@pytest.fixture(scope="module")
def model(small_ckpt: Checkpoint, load_model):
    return load_model(small_ckpt.path)


@pytest.fixture(scope="module")
def stops(small_ckpt: Checkpoint) -> tuple[int, ...]:
    return stop_ids_of(small_ckpt.path)


@pytest.fixture(scope="module")
def prompt(small_ckpt: Checkpoint) -> list[int]:
    return small_ckpt.prompt(10, seed=21)


def _greedy_ref(ck: Checkpoint, ids, n, stops) -> list[int]:
    return ck.ref_greedy(list(ids), n, stop_ids=stops)


def _text(tok, ids) -> str:
    """The completion text of ids as generate() returns it: special tokens left out."""
    try:
        return tok.decode(list(ids), skip_special_tokens=True)
    except TypeError:  # a decode() without the keyword
        return tok.decode(list(ids))


# ----------------------------------------------------------------------------------------------
# determinism and greedy equivalences
# ----------------------------------------------------------------------------------------------


def test_same_seed_same_tokens(model, prompt) -> None:
    a = model.generate(prompt, max_new_tokens=16, temperature=1.0, seed=1234)
    b = model.generate(prompt, max_new_tokens=16, temperature=1.0, seed=1234)
    assert a == b
    t1 = model.generate("The sea is", max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    t2 = model.generate("The sea is", max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    assert isinstance(t1, str) and t1 == t2


def test_different_seeds_usually_differ(model, prompt) -> None:
    outs = [
        tuple(model.generate(prompt, max_new_tokens=16, temperature=1.0, seed=s))
        for s in range(N_SEEDS)
    ]
    assert len(set(outs)) >= N_SEEDS - 2, outs


def test_temperature_zero_is_greedy(model, small_ckpt, prompt, stops) -> None:
    want = small_ckpt.ref_greedy(prompt, 24)
    got = model.generate(prompt, max_new_tokens=24, temperature=0)
    assert_greedy_match(got, want, stops, 24, what="temperature=0")
    # a seed and filters make no difference at temperature 0
    again = model.generate(prompt, max_new_tokens=24, temperature=0, seed=99, top_k=5, top_p=0.5)
    assert again == got


@pytest.mark.parametrize(
    "kwargs",
    [{"top_k": 1}, {"top_p": 1e-9}, {"min_p": 1.0}, {"top_k": 1, "top_p": 0.9, "min_p": 0.5}],
    ids=["top_k=1", "top_p=tiny", "min_p=1", "combined"],
)
def test_filters_that_collapse_to_greedy(model, prompt, kwargs) -> None:
    greedy = model.generate(prompt, max_new_tokens=16, temperature=0)
    for seed in range(3):
        assert (
            model.generate(prompt, max_new_tokens=16, temperature=1.0, seed=seed, **kwargs)
            == greedy
        )


@pytest.mark.parametrize("temperature", [1e-40, 1e-38, 1e-30])
def test_tiny_temperatures_are_greedy(model, prompt, temperature) -> None:
    """Temperatures so small that 1/T or logit/T leave float32's range sample the limit, the
    greedy token, with any filter (they gave NaN probabilities and padding ids)."""
    greedy = model.generate(prompt, max_new_tokens=12, temperature=0)
    for kwargs in ({}, {"top_k": 5}, {"top_p": 0.5}, {"min_p": 0.5}):
        got = model.generate(prompt, max_new_tokens=12, temperature=temperature, seed=1, **kwargs)
        assert got == greedy, kwargs


def test_greedy_text_matches_reference(model, small_ckpt, stops) -> None:
    tok = model.tokenizer
    text_prompt = "What is the capital of France?"
    ids = tok.encode(text_prompt)
    assert ids == _tokenizers_encode(small_ckpt.path, text_prompt)
    want_ids = _greedy_ref(small_ckpt, ids, 20, stops)
    got = model.generate(text_prompt, max_new_tokens=20, temperature=0)
    assert got == _text(tok, want_ids)


def _tokenizers_encode(path: str, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return (
        Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        .encode(text, add_special_tokens=False)
        .ids
    )


# ----------------------------------------------------------------------------------------------
# the sampling distribution
# ----------------------------------------------------------------------------------------------


def _first_token_probs(ck: Checkpoint, prompt: list[int], temperature: float) -> np.ndarray:
    logits = ck.ref_logits(prompt)[-1] / temperature
    p = np.exp(logits - logits.max())
    return p / p.sum()


def _sample_first_tokens(model, prompt, n: int, **kwargs) -> np.ndarray:
    """The first generated id of n seeded runs (-1 when a run stopped at once on a stop id)."""
    firsts = []
    for s in range(n):
        out = model.generate(prompt, max_new_tokens=1, seed=s, **kwargs)
        firsts.append(out[0] if out else -1)
    return np.array(firsts)


def test_top_k_support_and_frequencies(model, small_ckpt, prompt, stops) -> None:
    """top_k=3 at T=0.7: only the 3 best tokens appear, with softmax(logits/0.7) frequencies."""
    p = _first_token_probs(small_ckpt, prompt, 0.7)
    top3 = np.argsort(-p)[:3]
    assert not set(top3.tolist()) & set(stops)
    n = 300
    draws = _sample_first_tokens(model, prompt, n, temperature=0.7, top_k=3)
    assert set(draws.tolist()) <= set(top3.tolist())
    q = p[top3] / p[top3].sum()
    freq = np.array([(draws == t).mean() for t in top3])
    sigma = np.sqrt(q * (1 - q) / n)
    assert np.all(np.abs(freq - q) <= 5 * sigma + 1e-9), (freq, q)


def test_top_p_and_min_p_cut_the_tail(model, small_ckpt, prompt) -> None:
    """At T=1 (so the order of the filters does not matter) choose thresholds that keep exactly
    the two most likely tokens."""
    p = _first_token_probs(small_ckpt, prompt, 1.0)
    order = np.argsort(-p)
    top2 = set(order[:2].tolist())
    top_p = float(p[order[0]] + 0.5 * p[order[1]])  # nucleus needs the 2nd token, not the 3rd
    draws = _sample_first_tokens(model, prompt, 60, temperature=1.0, top_p=top_p)
    assert set(draws.tolist()) <= top2 and len(set(draws.tolist())) == 2
    ratio = p[order[2]] / p[order[0]], p[order[1]] / p[order[0]]
    min_p = float(np.mean(ratio))  # between p3/p1 and p2/p1
    draws = _sample_first_tokens(model, prompt, 60, temperature=1.0, min_p=min_p)
    assert set(draws.tolist()) <= top2 and len(set(draws.tolist())) == 2


# ----------------------------------------------------------------------------------------------
# lengths and stop strings
# ----------------------------------------------------------------------------------------------


def test_max_new_tokens_is_respected(model, small_ckpt, prompt, stops) -> None:
    want = small_ckpt.ref_greedy(prompt, 12)
    for n in (0, 1, 5, 12):
        got = model.generate(prompt, max_new_tokens=n, temperature=0)
        assert len(got) <= n
        assert_greedy_match(got, want[:n], stops, n, what=f"max_new_tokens={n}")
        sampled = model.generate(prompt, max_new_tokens=n, temperature=1.0, seed=n)
        assert len(sampled) <= n
    assert model.generate("Hello", max_new_tokens=0) == ""
    assert list(model.generate("Hello", max_new_tokens=0, stream=True)) in ([], [""])


def _greedy_text_and_boundaries(model, text_prompt: str, n: int) -> tuple[str, list[int]]:
    tok = model.tokenizer
    ids = model.generate(tok.encode(text_prompt), max_new_tokens=n, temperature=0)
    text = model.generate(text_prompt, max_new_tokens=n, temperature=0)
    assert text == _text(tok, ids)
    bounds = [len(_text(tok, ids[:k])) for k in range(1, len(ids))]
    return text, bounds


def test_stop_strings_cut_exactly(model) -> None:
    prompt_text = "The quick brown fox"
    text, bounds = _greedy_text_and_boundaries(model, prompt_text, 32)
    # a stop string that straddles a token boundary, away from any replacement character
    cands = [
        b
        for b in bounds
        if 2 <= b <= len(text) - 3
        and "\ufffd" not in text[b - 2 : b + 3]
        and text[b - 2 : b + 3].strip()
    ]
    assert cands, f"no usable token boundary in {text!r}"
    b = cands[len(cands) // 2]
    stop = text[b - 2 : b + 3]
    want = text[: text.find(stop)]
    got = model.generate(prompt_text, max_new_tokens=32, temperature=0, stop=stop)
    assert got == want
    pieces = list(
        model.generate(prompt_text, max_new_tokens=32, temperature=0, stop=stop, stream=True)
    )
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == want
    # several stop strings: the earliest occurrence wins; an absent one changes nothing
    assert (
        model.generate(prompt_text, max_new_tokens=32, temperature=0, stop=["@@never@@", stop])
        == want
    )
    assert model.generate(prompt_text, max_new_tokens=32, temperature=0, stop=["@@never@@"]) == text
    # a stop string at the very start returns nothing
    assert model.generate(prompt_text, max_new_tokens=32, temperature=0, stop=text[:1]) == ""


def test_streaming_equals_non_streaming(model) -> None:
    for kwargs in (
        {"temperature": 0},
        {"temperature": 1.0, "seed": 5},
        {"temperature": 0.8, "top_k": 20, "seed": 6},
    ):
        text = model.generate("Numbers and dates:", max_new_tokens=24, **kwargs)
        stream = model.generate("Numbers and dates:", max_new_tokens=24, stream=True, **kwargs)
        assert not isinstance(stream, (str, list))
        assert "".join(stream) == text


# ----------------------------------------------------------------------------------------------
# repetition penalty
# ----------------------------------------------------------------------------------------------


def test_repetition_penalty_changes_a_repetitive_greedy_run(
    model, small_ckpt, prompt, stops
) -> None:
    """Greedy decoding of this model repeats a token at step k. With a penalty of 100 the
    repeated token's logit falls below the best never-seen token's, whichever context the
    penalty counts (generated ids only, or prompt + generated), so the run must change."""
    g = small_ckpt.ref_greedy(prompt, 32)
    k = next((i for i in range(1, len(g)) if g[i] in g[:i]), None)
    assert k is not None, f"precondition: the greedy run repeats a token ({g})"
    penalty = 100.0
    logits = small_ckpt.ref_logits(prompt + g[:k])[-1]
    tok = g[k]
    penalized = logits[tok] / penalty if logits[tok] > 0 else logits[tok] * penalty
    unseen = np.ones(len(logits), dtype=bool)
    unseen[list(set(prompt) | set(g[:k]))] = False
    assert penalized < logits[unseen].max(), "precondition: the penalty must flip step k"

    plain = model.generate(prompt, max_new_tokens=k + 1, temperature=0, repetition_penalty=1.0)
    assert_greedy_match(plain, g[: k + 1], stops, k + 1, what="penalty 1.0")
    if len(plain) < k + 1:
        pytest.skip("greedy run hit a stop id before the repeated token")
    penalized_run = model.generate(
        prompt, max_new_tokens=k + 1, temperature=0, repetition_penalty=penalty
    )
    assert penalized_run != plain


# ----------------------------------------------------------------------------------------------
# streaming never splits a UTF-8 character
# ----------------------------------------------------------------------------------------------

CYCLE_TEXT = "你😀"  # E4 BD A0 | F0 9F 98 80: 7 single-byte tokens


@pytest.fixture(scope="module")
def cycle_ckpt(tmp_path_factory) -> tuple[str, list[int], dict, dict]:
    """A model whose greedy continuation repeats the 7 byte tokens of "你😀" forever."""
    cfg = testing.random_plm_config(
        hidden_size=64,
        num_attention_heads=4,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        kv_lora_rank=32,
        intermediate_size=256,
        vocab_size=503,
        num_hidden_layers=2,
    )
    tok_json = testing.tokenizer_json(503 - 3 - 8)
    cycle = [testing.byte_token_id(tok_json, b) for b in CYCLE_TEXT.encode("utf-8")]
    weights = testing.cycle_weights(cfg, cycle, seed=8)
    path = testing.write_checkpoint(tmp_path_factory.mktemp("cycle") / "m", cfg, weights)
    return path, cycle, cfg, weights


def test_cycle_model_is_what_we_think(cycle_ckpt) -> None:
    path, cycle, cfg, weights = cycle_ckpt
    assert reference.reference_generate_greedy(cfg, weights, cycle, 14) == cycle * 2
    assert _tokenizers_encode(path, CYCLE_TEXT) == cycle


def test_stream_never_yields_half_a_character(cycle_ckpt, load_model) -> None:
    path, cycle, _, _ = cycle_ckpt
    model = load_model(path)
    assert model.tokenizer.encode(CYCLE_TEXT) == cycle
    # ids in, ids out: the engine follows the cycle byte by byte
    assert model.generate(cycle, max_new_tokens=14, temperature=0) == cycle * 2
    # text out: whole characters only
    pieces = list(model.generate(CYCLE_TEXT, max_new_tokens=14, temperature=0, stream=True))
    assert pieces and all("\ufffd" not in p for p in pieces), pieces
    assert "".join(pieces) == CYCLE_TEXT * 2
    assert model.generate(CYCLE_TEXT, max_new_tokens=14, temperature=0) == CYCLE_TEXT * 2
    # ending inside a character: no replacement character before the very end, and the
    # streamed pieces still join to the non-streamed text
    for n in (8, 9, 10, 12):
        pieces = list(model.generate(CYCLE_TEXT, max_new_tokens=n, temperature=0, stream=True))
        assert all("\ufffd" not in p for p in pieces[:-1]), (n, pieces)
        assert "".join(pieces) == model.generate(CYCLE_TEXT, max_new_tokens=n, temperature=0)
        assert "".join(pieces).startswith(CYCLE_TEXT)


# ----------------------------------------------------------------------------------------------
# chat
# ----------------------------------------------------------------------------------------------


def test_chat_renders_the_shipped_template(model, small_ckpt) -> None:
    jinja2 = pytest.importorskip("jinja2")
    msgs = [{"role": "user", "content": "What is two plus three?"}]
    rendered = (
        jinja2.Environment()
        .from_string(testing.CHAT_TEMPLATE)
        .render(messages=msgs, add_generation_prompt=True)
    )
    want = model.generate(rendered, max_new_tokens=10, temperature=0)
    assert model.chat(msgs, max_new_tokens=10, temperature=0) == want
    assert "".join(model.chat(msgs, max_new_tokens=10, temperature=0, stream=True)) == want
