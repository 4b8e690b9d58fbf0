"""The test oracles themselves: the NumPy reference, the transformers mapping, the file writers.

These tests need no engine. They establish, before any engine test relies on them, that
  1. DeepseekV2ForCausalLM configured as in docs §6 (`conftest.hf_config_from_plm`) computes the
     same logits as the float64 NumPy reference written from docs §3, on every test shape;
  2. the reference's dense and weight-absorbed MLA formulations agree to rounding (1e-9);
  3. the comparison is sensitive: the wrong RoPE pair convention, a wrong latent norm or the
     wrong RoPE base move the logits by orders of magnitude more than the tolerance;
  4. our safetensors writer produces files the `safetensors` package reads back bit for bit
     (F32/F16/BF16, single and sharded), and the tiny tokenizer behaves like Qwen2's.

Mapping notes (transformers 5.24, found by reading modeling_deepseek_v2.py):
  * RoPE: `apply_rotary_emb` views the rope slice as complex numbers (x[2i] + i·x[2i+1]) and
    multiplies by e^{i p θ_i} - exactly PLM's adjacent-pair rotation on the raw, unpermuted
    slice. No weight permutation is needed (older DeepSeek ports de-interleave + rotate_half,
    which is the same math). The rotation runs in float32 and is cast back to float64.
  * Config spelling: `rope_parameters={"rope_type": "default", "rope_theta": θ}`; the RoPE width
    is `head_dim`, which DeepseekV2Config.__post_init__ sets to qk_rope_head_dim.
  * Dense layers: `first_k_dense_replace = num_hidden_layers` (layer i is MoE iff
    i >= first_k_dense_replace). n_routed_experts keeps its default; no MoE module is built.
  * MLP: gated `down(act(gate x) * up x)`; hidden_act="relu" with gate_proj := up_proj gives
    relu(z)·z = relu(z)² exactly.
  * kv_a_layernorm is built with eps=1e-6 regardless of rms_norm_eps (PLM uses 1e-6 anyway).
  * RMSNorm and softmax upcast to float32, so agreement is ~1e-7 relative, not 1e-12.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    SHAPES,
    Checkpoint,
    hf_config_from_plm,
    hf_greedy,
    hf_greedy_recompute,
    hf_logits,
    hf_model_from_checkpoint,
    hf_model_from_weights,
    reference,
    rel_err,
    testing,
)

HF_TOL = 1e-6  # HF (float32 RoPE/RMSNorm/softmax inside a float64 model) vs float64 reference
ABSORB_TOL = 1e-9  # the two float64 formulations of the reference


# ----------------------------------------------------------------------------------------------
# reference internals
# ----------------------------------------------------------------------------------------------


def test_rope_rotates_adjacent_pairs() -> None:
    theta, rope = 10000.0, 8
    x = np.zeros((1, rope))
    x[0, 2] = 1.0  # pair i = 1, first element
    p = 3
    out = reference.rope_adjacent(x, np.array([p]), theta)
    ang = p * theta ** (-2.0 * 1 / rope)
    want = np.zeros(rope)
    want[2], want[3] = np.cos(ang), np.sin(ang)
    np.testing.assert_allclose(out[0], want, atol=1e-15)
    # position 0 is the identity; norms of pairs are preserved everywhere
    y = np.random.default_rng(0).standard_normal((5, rope))
    np.testing.assert_allclose(reference.rope_adjacent(y[:1], np.array([0]), theta), y[:1])
    r = reference.rope_adjacent(y, np.arange(5), theta)
    np.testing.assert_allclose(r[:, 0::2] ** 2 + r[:, 1::2] ** 2, y[:, 0::2] ** 2 + y[:, 1::2] ** 2)


def test_rms_norm() -> None:
    x = np.array([[3.0, 4.0]])
    g = np.array([1.0, 2.0])
    out = reference.rms_norm(x, g, 0.0)
    np.testing.assert_allclose(out, [[3.0 / np.sqrt(12.5), 8.0 / np.sqrt(12.5)]])


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_dense_equals_absorbed(checkpoints: dict[str, Checkpoint], name: str, error_log) -> None:
    ck = checkpoints[name]
    ids = ck.prompt(24)
    dense = ck.ref_logits(ids)
    absorbed = reference.reference_logits_absorbed(ck.config, ck.weights, ids)
    err = rel_err(absorbed, dense)
    error_log.record(name, "ref_dense_vs_absorbed", err)
    assert err <= ABSORB_TOL


def test_reference_is_causal(small_ckpt: Checkpoint) -> None:
    ids = small_ckpt.prompt(12)
    full = small_ckpt.ref_logits(ids)
    prefix = reference.reference_logits(small_ckpt.config, small_ckpt.weights, ids[:7])
    assert rel_err(full[:7], prefix) < 1e-12


def test_greedy_uses_the_cache_consistently(small_ckpt: Checkpoint) -> None:
    ids = small_ckpt.prompt(6)
    gen = small_ckpt.ref_greedy(ids, 12)
    logits = small_ckpt.ref_logits(ids + gen)
    want = [int(np.argmax(row)) for row in logits[len(ids) - 1 : -1]]
    assert gen == want


def test_random_weights_are_realistic(small_ckpt: Checkpoint) -> None:
    """O(1) activations, ~50 % ReLU² zeros, logits neither flat nor one-hot."""
    cfg, w = small_ckpt.config, small_ckpt.weights
    ids = small_ckpt.prompt(64)
    h = w["model.embed_tokens.weight"][ids].astype(np.float64)
    b = reference.rms_norm(h, w["model.layers.0.post_attention_layernorm.weight"], 1e-6)
    u = b @ w["model.layers.0.mlp.up_proj.weight"].T
    zeros = float(np.mean(u <= 0))
    assert 0.4 < zeros < 0.6, zeros
    logits = small_ckpt.ref_logits(ids)
    assert 0.5 < logits.std() < 4.0
    g = w["model.norm.weight"]
    assert 0.5 < g.min() and g.max() < 1.5 and 0.05 < g.std() < 0.2
    assert all(np.isfinite(v).all() for v in w.values())
    assert set(w) == set(testing.tensor_shapes(cfg))
    for name, shape in testing.tensor_shapes(cfg).items():
        assert w[name].shape == shape and w[name].dtype == np.float32


def test_cycle_weights_follow_the_cycle() -> None:
    cfg = testing.random_plm_config(**SHAPES["a"])
    cycle = [300, 17, 250, 42, 499]
    w = testing.cycle_weights(cfg, cycle, seed=5)
    out = reference.reference_generate_greedy(cfg, w, [cycle[2]], 12)
    assert out == [cycle[(3 + k) % 5] for k in range(12)]
    logits = reference.reference_logits(cfg, w, [cycle[0]])[0]
    top2 = np.sort(logits)[-2:]
    assert top2[1] - top2[0] > 1.0  # an unambiguous argmax even in low precision


# ----------------------------------------------------------------------------------------------
# the transformers oracle
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_hf_deepseek_v2_matches_reference(
    checkpoints: dict[str, Checkpoint], name: str, hf_models, error_log
) -> None:
    ck = checkpoints[name]
    ids = ck.prompt(min(48, ck.max_pos))
    err = rel_err(hf_logits(hf_models(ck), ids), ck.ref_logits(ids))
    error_log.record(name, "hf_vs_ref", err)
    assert err <= HF_TOL


def test_hf_matches_reference_at_the_end_of_the_context(
    checkpoints: dict[str, Checkpoint], hf_models
) -> None:
    """All 128 positions of shape 'c' (largest RoPE angles; RoPE in float32 inside HF)."""
    ck = checkpoints["c"]
    ids = ck.prompt(ck.max_pos, seed=7)
    err = rel_err(hf_logits(hf_models(ck), ids), ck.ref_logits(ids))
    assert err <= HF_TOL


def test_hf_greedy_matches_reference(checkpoints: dict[str, Checkpoint], hf_models) -> None:
    for ck in checkpoints.values():
        ids = ck.prompt(8)
        assert hf_greedy(hf_models(ck), ids, 16) == ck.ref_greedy(ids, 16), ck.name
    ck = checkpoints["b"]
    assert hf_greedy_recompute(hf_models(ck), ck.prompt(8), 8) == ck.ref_greedy(ck.prompt(8), 8)


def test_hf_checkpoint_loader(small_ckpt: Checkpoint, hf_models) -> None:
    model = hf_model_from_checkpoint(small_ckpt.path)
    ids = small_ckpt.prompt(10)
    assert rel_err(hf_logits(model, ids), small_ckpt.ref_logits(ids)) <= HF_TOL


def test_hf_config_mapping_builds_dense_layers(small_ckpt: Checkpoint, hf_models) -> None:
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

    model = hf_models(small_ckpt)
    assert all(type(layer.mlp) is m.DeepseekV2MLP for layer in model.model.layers)
    cfg = hf_config_from_plm(small_ckpt.config)
    assert cfg.head_dim == small_ckpt.config["qk_rope_head_dim"]
    assert cfg.rope_parameters["rope_theta"] == small_ckpt.config["rope_theta"]


def test_q_lora_variant_matches_hf(hf_models) -> None:
    """A DeepSeek-V2 style low-rank query (q_a_proj, q_a_layernorm, q_b_proj) also agrees."""
    cfg = testing.random_plm_config(**SHAPES["a"], q_lora_rank=24)
    w = testing.random_plm_weights(cfg, seed=11)
    assert "model.layers.0.self_attn.q_a_proj.weight" in w
    ids = list(range(3, 60, 3))
    ref = reference.reference_logits(cfg, w, ids)
    assert rel_err(hf_logits(hf_model_from_weights(cfg, w), ids), ref) <= HF_TOL
    assert rel_err(reference.reference_logits_absorbed(cfg, w, ids), ref) <= ABSORB_TOL


def _permute_rope_rows_to_half_split(config: dict, weights: dict) -> dict:
    """The classic porting bug: treat the rope slice as halves instead of adjacent pairs."""
    H, nope, rope, r = (
        config[k]
        for k in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim", "kv_lora_rank")
    )
    perm = np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])
    w = {k: v.copy() for k, v in weights.items()}
    for i in range(config["num_hidden_layers"]):
        q = w[f"model.layers.{i}.self_attn.q_proj.weight"].reshape(H, nope + rope, -1)
        q[:, nope:] = q[:, nope:][:, perm]
        kva = w[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"]
        kva[r:] = kva[r:][perm]
    return w


def test_oracle_detects_porting_bugs(small_ckpt: Checkpoint) -> None:
    """Each classic mistake moves the logits by far more than the tolerance."""
    cfg, w = small_ckpt.config, small_ckpt.weights
    ids = small_ckpt.prompt(24)
    good = small_ckpt.ref_logits(ids)
    # half-split RoPE (de-interleaved weights, adjacent rotation) != adjacent-pair RoPE
    assert (
        rel_err(
            reference.reference_logits(cfg, _permute_rope_rows_to_half_split(cfg, w), ids), good
        )
        > 1e-3
    )
    # skipping the latent RMSNorm
    w2 = dict(w)
    for i in range(cfg["num_hidden_layers"]):
        w2[f"model.layers.{i}.self_attn.kv_a_layernorm.weight"] = (
            w[f"model.layers.{i}.self_attn.kv_a_layernorm.weight"] * 1.5
        )
    assert rel_err(reference.reference_logits(cfg, w2, ids), good) > 1e-3
    # the wrong RoPE base
    assert rel_err(reference.reference_logits(dict(cfg, rope_theta=10000.0), w, ids), good) > 1e-3


# ----------------------------------------------------------------------------------------------
# safetensors writer
# ----------------------------------------------------------------------------------------------


def test_bf16_round_to_nearest_even() -> None:
    torch = pytest.importorskip("torch")
    specials = np.array(
        [
            1.0,
            1.0 + 2**-8,
            1.0 + 3 * 2**-8,
            -1.0 - 2**-8,
            1e-40,
            -0.0,
            3.4e38,
            np.inf,
            -np.inf,
            65504.0,
            1.00390625,
            1.01171875,
        ],
        dtype=np.float32,
    )
    x = np.concatenate(
        [specials, np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 10]
    )
    got = testing.bf16_bits(x)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(got, want)
    assert testing.bf16_to_f32(testing.bf16_bits(np.array([1.0 + 2**-8], np.float32)))[0] == 1.0
    nan = testing.bf16_bits(np.array([np.nan], np.float32))
    assert np.isnan(testing.bf16_to_f32(nan))[0]


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_writer_roundtrip_with_safetensors_package(tmp_path, dtype: str) -> None:
    pytest.importorskip("safetensors")
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    rng = np.random.default_rng(1)
    tensors = {
        "b.w": rng.standard_normal((3, 5)).astype(np.float32),
        "a.g": rng.standard_normal(7).astype(np.float32),
        "z": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "t.safetensors"
    testing.write_safetensors(path, tensors, dtype)
    header, start = testing.read_safetensors_header(str(path))
    assert start % 8 == 0 and header["__metadata__"] == {"format": "pt"}
    assert os.path.getsize(path) == start + max(
        v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"
    )
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            t = f.get_tensor(k)
            assert tuple(t.shape) == v.shape
            np.testing.assert_array_equal(
                t.to(torch.float32).numpy(), testing.round_to_dtype(v, dtype)
            )
    got = reference.read_safetensors(str(path))
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k].astype(np.float32), testing.round_to_dtype(v, dtype))
    # unsupported dtypes are written as-is when asked for
    testing.write_safetensors(
        path, {"i": np.arange(6, dtype=np.int32).reshape(2, 3), "d": np.ones(2)}
    )
    header, _ = testing.read_safetensors_header(str(path))
    assert header["i"]["dtype"] == "I32" and header["d"]["dtype"] == "F64"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # atomic writes clean up


@pytest.mark.parametrize(
    "dtype,shards", [("f32", 1), ("f16", 1), ("bf16", 1), ("f32", 3), ("bf16", 2)]
)
def test_checkpoint_files(tmp_path, small_ckpt: Checkpoint, dtype: str, shards: int) -> None:
    path = testing.write_checkpoint(
        tmp_path / "m", small_ckpt.config, small_ckpt.weights, dtype=dtype, shards=shards
    )
    files = sorted(os.listdir(path))
    if shards == 1:
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    else:
        index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
        shard_files = sorted(set(index["weight_map"].values()))
        assert shard_files == [
            f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)
        ]
        assert set(index["weight_map"]) == set(small_ckpt.weights)
        assert "model.safetensors" not in files
    config, weights = reference.load_weights(path)
    assert config["torch_dtype"] == {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
    assert config["architectures"] == ["PLMForCausalLM"] and config["model_type"] == "plm"
    assert set(weights) == set(small_ckpt.weights)
    for k, v in small_ckpt.weights.items():
        np.testing.assert_array_equal(weights[k], testing.round_to_dtype(v, dtype))


def test_config_is_hf_format() -> None:
    cfg = testing.random_plm_config()
    for key, value in {
        "architectures": ["PLMForCausalLM"],
        "model_type": "plm",
        "hidden_act": "relu2",
        "q_lora_rank": None,
        "tie_word_embeddings": True,
        "rope_scaling": None,
        "attention_bias": False,
    }.items():
        assert cfg[key] == value, key
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"]
    cfg = testing.random_plm_config(num_attention_heads=8)
    assert cfg["num_key_value_heads"] == 8
    assert json.loads(json.dumps(cfg)) == cfg


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------


def test_tokenizer_files(small_ckpt: Checkpoint) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(small_ckpt.path, "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) <= small_ckpt.vocab
    specials = [int(tok.token_to_id(s) or -1) for s in testing.SPECIAL_TOKENS]
    assert specials == list(range(specials[0], specials[0] + 3))  # appended after the BPE vocab
    text = "Hello world! The sea is grey, 3.14 — naïve café 你好 😀\n"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text  # byte-level: lossless, no BOS, no prefix space
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == specials[1]
    assert len(tok.encode("the").ids) == 1  # merges were learnt
    # NFC normalisation: decomposed é encodes like the composed one
    assert tok.encode("e\u0301").ids == tok.encode("\u00e9").ids
    # every byte has its own token (so generation can split a multi-byte character)
    for b in (0x00, 0x41, 0x80, 0xE4, 0xF0, 0xFF):
        tid = testing.byte_token_id(tok.to_str(), b)
        assert tok.id_to_token(tid) == testing.bytes_to_unicode()[b]


def test_tokenizer_is_deterministic_across_processes() -> None:
    code = (
        "import hashlib, importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('t', {testing.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(hashlib.sha256(m.tokenizer_json(492).encode()).hexdigest())\n"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, PYTHONHASHSEED=str(seed), RAYON_NUM_THREADS=str(th)),
        ).stdout.strip()
        for seed, th in ((1, 1), (2, 2))
    }
    assert len(outs) == 1
    import hashlib

    assert outs == {hashlib.sha256(testing.tokenizer_json(492).encode()).hexdigest()}


# AutoTokenizer reads config.json, whose PLM-style "rope_scaling": null transformers 5 flags.
@pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")
def test_chat_template_renders_chatml(small_ckpt: Checkpoint) -> None:
    jinja2 = pytest.importorskip("jinja2")
    cfg = json.loads(Path(small_ckpt.path, "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["bos_token"] is None and cfg["eos_token"] == "<|im_end|>"
    assert cfg["pad_token"] == "<|endoftext|>"
    tmpl = jinja2.Environment().from_string(cfg["chat_template"])
    out = tmpl.render(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert out == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    out = tmpl.render(
        messages=[
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"},
        ],
        add_generation_prompt=False,
    )
    assert (
        out
        == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )
    # transformers renders the same template the same way
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(small_ckpt.path)
    msgs = [{"role": "user", "content": "Hi"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        tmpl.render(messages=msgs, add_generation_prompt=True)
    )
    assert hf_tok.encode("Hello there") == hf_tok.encode("Hello there", add_special_tokens=True)
