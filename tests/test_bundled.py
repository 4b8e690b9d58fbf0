"""The bundled, trained plm-tiny model (python/sparselm/models/plm-tiny).

Its greedy continuation is checked against the ids the training script's own torch model
produced (metrics.json, written at training time: an independent implementation). Sparsity and
perplexity are measured on the held-out validation.txt and checked against loose bounds a
trained ReLU² model clearly exceeds and an untrained or broken one does not.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Generator

import numpy as np
import pytest
import sparselm

MODEL = sparselm.bundled_model_path()
pytestmark = pytest.mark.skipif(
    not (MODEL / "model.safetensors").is_file(), reason="bundled model not present"
)


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((MODEL / "metrics.json").read_text())


@pytest.fixture(scope="module")
def model() -> sparselm.Model:
    return sparselm.load()


def test_loads_by_default_and_is_plm(model: sparselm.Model) -> None:
    assert model.config["model_type"] == "plm"
    assert model.config["q_lora_rank"] is None
    assert model.dtype == "bf16"
    assert model.tokenizer.token_to_id("<|im_end|>") is not None


def test_greedy_matches_the_training_implementation(model: sparselm.Model, metrics: dict) -> None:
    sample = metrics["greedy_sample"]
    prompt = model.tokenizer.encode(sample["prompt"])
    got = model.generate(prompt, max_new_tokens=sample["new_tokens"], temperature=0)
    # bf16 weights, f32 (sparselm) vs f32 (torch) arithmetic: the first 24 tokens must agree
    # exactly; a later divergence could only come from a near-tie.
    assert got[:24] == sample["ids"][:24]
    text = model.generate(sample["prompt"], max_new_tokens=24, temperature=0)
    assert text == model.tokenizer.decode(sample["ids"][:24], skip_special_tokens=True)


def test_greedy_output_is_stable_across_calls_and_threads(model: sparselm.Model) -> None:
    a = model.generate("Once upon a time", max_new_tokens=20)
    b = model.generate("Once upon a time", max_new_tokens=20)
    c = sparselm.load(threads=1).generate("Once upon a time", max_new_tokens=20)
    assert a == b == c
    assert len(a.split()) >= 8  # real words, not an empty or one-token loop


def _windows(model: sparselm.Model, n_windows: int = 24, width: int = 256) -> list[list[int]]:
    text = (MODEL / "validation.txt").read_text(encoding="utf-8")
    ids = model.tokenizer.encode(text)
    return [ids[i : i + width] for i in range(0, n_windows * width, width)]


def _eval(model: sparselm.Model, windows: list[list[int]]) -> tuple[float, np.ndarray]:
    """Perplexity over the windows (each a fresh context) and the top-1 ids at every position."""
    nll, n, top1 = 0.0, 0, []
    for w in windows:
        s = model.session(max_seq=len(w))
        logits = s.feed(w, all_logits=True).astype(np.float64)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((lse[:-1] - logits[np.arange(len(w) - 1), w[1:]]).sum())
        n += len(w) - 1
        top1.append(logits.argmax(-1))
    return math.exp(nll / n), np.concatenate(top1)


def test_sparsity_and_perplexity_on_held_out_text(model: sparselm.Model) -> None:
    from sparselm import _native

    eng = _native.Engine(str(MODEL), "auto", 0)
    windows = _windows(model)
    zeros = np.zeros(model.config["num_hidden_layers"])
    for w in windows:
        sess = eng.new_session(len(w))
        sess.feed(w, "auto", False)
        zeros += np.asarray(sess.stats()["layer_sparsity"])
    layer = zeros / len(windows)
    print(f"[bundled] sparsity per layer {np.round(layer, 3).tolist()}, mean {layer.mean():.3f}")
    assert layer.mean() > 0.6, "a trained ReLU² model zeroes most neurons"
    assert (layer > 0.5).all()
    ppl, _ = _eval(model, windows)
    print(f"[bundled] validation perplexity {ppl:.2f}")
    # Unigram perplexity of this text is several hundred; the trained model is ~60.
    assert ppl < 100


@pytest.mark.parametrize("dtype,min_agree", [("q8_0", 0.97), ("q4_0", 0.85), ("f16", 0.995)])
def test_quantized_formats_agree_with_f32(
    model: sparselm.Model, dtype: str, min_agree: float
) -> None:
    windows = _windows(model, n_windows=6)
    ref = sparselm.load(dtype="f32")
    q = sparselm.load(dtype=dtype)
    ppl_ref, top_ref = _eval(ref, windows)
    ppl_q, top_q = _eval(q, windows)
    agree = float((top_ref == top_q).mean())
    print(f"[bundled] {dtype}: ppl {ppl_q:.3f} vs f32 {ppl_ref:.3f}, top-1 agreement {agree:.4f}")
    assert agree >= min_agree
    assert ppl_q < ppl_ref * 1.05


def test_cli_info_shows_the_checkpoint_architectures(capsys: pytest.CaptureFixture[str]) -> None:
    """`architectures` comes from config.json (the engine keeps only the fields it checks)."""
    from sparselm import cli

    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architectures"] == ["PLMForCausalLM"] and info["bundled"]
    assert info["down_layout"] is None  # the bundled checkpoint is bf16, not quantized


def test_session_continues_after_every_returned_token(model: sparselm.Model) -> None:
    """A run's last token reaches the cache only when the next one is computed; a continued
    session must still start after it, whatever ended the run (its length, a stop string, a
    closed stream), so greedy runs split in two equal one run of the same length."""
    ids = model.tokenizer.encode("Once upon a time")
    whole = model.generate(ids, max_new_tokens=12)
    session = model.session()
    first = session.generate(ids, max_new_tokens=5)  # ended by its length
    assert session.tokens == ids + first[:-1]  # the last one is not computed yet
    assert first + session.generate([], max_new_tokens=7) == whole

    text = model.generate("Once upon a time", max_new_tokens=12)
    session = model.session()
    head = session.generate("Once upon a time", max_new_tokens=6)
    assert head + session.generate("", max_new_tokens=6) == text

    # a stop string: the returned text is cut before it, the session holds its tokens
    stop = whole[6:8]
    stop_text = model.tokenizer.decode(stop)
    session = model.session()
    cut = session.generate("Once upon a time", max_new_tokens=12, stop=stop_text)
    assert stop_text not in cut and text.startswith(cut + stop_text)
    assert session.generate([], max_new_tokens=4) == whole[8:12]

    # a stream left after three pieces
    session = model.session()
    stream = session.generate(ids, max_new_tokens=12, stream=True)
    got = [t for _, t in zip(range(3), stream)]
    assert got + session.generate([], max_new_tokens=9) == whole


def test_a_run_ended_by_the_context_cannot_continue(model: sparselm.Model) -> None:
    ids = model.tokenizer.encode("Once upon a time")
    session = model.session(max_seq=len(ids) + 3)
    out = session.generate(ids, max_new_tokens=10)
    assert len(out) == 4 and session.n_past == len(ids) + 3  # the 4th was never computed
    with pytest.raises(sparselm.ContextLengthError):
        session.generate([], max_new_tokens=1)


def test_chat_template_and_stop_tokens(model: sparselm.Model) -> None:
    out = model.chat([{"role": "user", "content": "Who is Mr. Darcy?"}], max_new_tokens=16)
    assert isinstance(out, str)
    assert "<|im_end|>" not in out


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
def test_decode_reports_down_bytes_it_skipped(
    model: sparselm.Model, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``down_bytes_skipped_per_token`` counts the W_down rows decode did not read: every zero
    neuron's row for the GGUF-row layouts, fewer for the planar int8 layout (a group of 32
    rows with many active neurons is read whole), none with sparsity switched off."""
    from sparselm import _native

    c = model.config
    layers, ni, d = c["num_hidden_layers"], c["intermediate_size"], c["hidden_size"]
    row_bytes = {"f16": 2 * d, "q8_0": d // 32 * 34, "q4_0": d // 32 * 18}[dtype]
    ids = model.tokenizer.encode("Once upon a time there was a little girl who liked to read.")[:12]

    def decode(dense: bool) -> dict:
        monkeypatch.setenv("SPARSELM_DENSE_MLP", "1" if dense else "0")
        sess = _native.Engine(str(MODEL), dtype, 0).new_session(len(ids))
        for t in ids:  # one token at a time: every step is a decode step
            sess.feed([t], "absorbed", False)
        return sess.stats()

    st = decode(False)
    zero_bytes = st["mlp_sparsity"] * layers * ni * row_bytes  # per token
    skipped = st["down_bytes_skipped_per_token"]
    print(
        f"[bundled] {dtype}: down bytes skipped {skipped:.0f} of {layers * ni * row_bytes} per token "
        f"(zero rows {zero_bytes:.0f})"
    )
    if dtype == "f16":
        assert skipped == pytest.approx(zero_bytes, rel=1e-9)
    else:
        assert 0 < skipped <= zero_bytes * (1 + 1e-9)
    assert decode(True)["down_bytes_skipped_per_token"] == 0


def test_greedy_generation_config_filters_apply_when_a_call_samples(tmp_path) -> None:
    # do_sample false with top_k 1: greedy by default, and a call's temperature samples with
    # the model's top_k = 1, i.e. still the argmax (before, the filter was dropped and the
    # call sampled from the whole vocabulary).
    d = tmp_path / "m"
    d.mkdir()
    for f in MODEL.iterdir():
        (d / f.name).symlink_to(f)
    (d / "generation_config.json").write_text('{"do_sample": false, "top_k": 1}')
    m = sparselm.load(d)
    assert m.generation_config.greedy and m.generation_config.top_k == 1
    greedy = m.generate("Once upon a time", max_new_tokens=24)
    hot = [
        m.generate("Once upon a time", max_new_tokens=24, temperature=1.5, seed=s) for s in (1, 2)
    ]
    assert hot == [greedy, greedy]
    # top_k = 0 from the call turns the filter off: the same seeds now sample other text
    free = [
        m.generate("Once upon a time", max_new_tokens=24, temperature=1.5, seed=s, top_k=0)
        for s in (1, 2)
    ]
    assert greedy not in free


def test_last_stats_per_session_and_not_overwritten_by_a_late_stream(
    model: sparselm.Model,
) -> None:
    # a stream closed after a newer generation ended used to overwrite its stats
    it = model.generate("Once upon a time", max_new_tokens=30, stream=True)
    next(it)
    model.generate("The king said", max_new_tokens=7)
    assert model.last_stats is not None and model.last_stats["completion_tokens"] == 7
    del it  # the abandoned stream ends now (reference count), recording "cancelled" stats
    gc.collect()
    assert model.last_stats["completion_tokens"] == 7
    assert model.last_stats["finish_reason"] == "length"
    # each session keeps its own (another session's generation used to show through)
    s1, s2 = model.session(), model.session()
    s1.generate("Once upon a time", max_new_tokens=3)
    s2.generate("The king said", max_new_tokens=5)
    assert s1.last_stats is not None and s1.last_stats["completion_tokens"] == 3
    assert s2.last_stats is not None and s2.last_stats["completion_tokens"] == 5
    assert model.last_stats["completion_tokens"] == 5
    assert model.session().last_stats is None


def test_session_copy_continues_as_the_original(model: sparselm.Model) -> None:
    import copy

    s = model.session(max_seq=200)
    s.generate("Once upon a time", max_new_tokens=8)
    c = s.copy()
    assert (c.n_past, c.tokens, c.max_seq) == (s.n_past, s.tokens, 200)
    # the copy continues exactly as the original does, and as one session doing both calls
    ref = model.session(max_seq=200)
    ref.generate("Once upon a time", max_new_tokens=8)
    want = ref.generate(" The dog", max_new_tokens=12)
    assert c.generate(" The dog", max_new_tokens=12) == want
    assert s.generate(" The dog", max_new_tokens=12) == want
    # independent caches: what happens to the copy does not change the original's next reply
    c.reset()
    c.generate("A cat sat on the mat and looked at the sky", max_new_tokens=4)
    assert s.generate(" Then", max_new_tokens=8) == ref.generate(" Then", max_new_tokens=8)
    assert s.tokens == ref.tokens
    # copied while a stream is open: the copy continues as after a closed stream
    s.reset()
    stream = s.generate("The little bird", max_new_tokens=20, stream=True)
    first = next(stream) + next(stream)
    d = copy.copy(s)
    # (the original's next call abandons its open stream)
    assert d.generate("", max_new_tokens=6) == s.generate("", max_new_tokens=6)
    assert first
    # chat history is copied too, and not shared
    s.reset()
    s.chat("Hello", max_new_tokens=4)
    e = copy.deepcopy(s)
    assert e.history == s.history and e.n_past == s.n_past
    e.chat("More", max_new_tokens=4)
    assert len(e.history) == 4 and len(s.history) == 2


def test_session_copy_during_a_chat_stream_has_the_turn_so_far(model: sparselm.Model) -> None:
    s = model.session()
    stream = s.chat("Hello", max_new_tokens=20, stream=True)
    shown = next(stream) + next(stream)
    c = s.copy()
    assert isinstance(stream, Generator)
    stream.close()  # the original commits the turn as far as it was read
    assert (
        c.history
        == s.history
        == [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": shown},
        ]
    )
    assert c.chat("More", max_new_tokens=8) == s.chat("More", max_new_tokens=8)
