"""Bad inputs raise the right typed exception, with a message that names the culprit.

Each case starts from a valid tiny checkpoint copied into tmp_path and breaks one thing. Nothing
may crash the interpreter: a Rust panic or a segfault would take pytest down with it, which is
how the fuzz test at the bottom detects them.

Where the test plan allows two reasonable classes (e.g. an unknown model_type may be a
ConfigError or an UnsupportedError), the test accepts both; everything must be a SparselmError.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import reference, rel_err, testing

# A deliberately small model so that rewriting and reloading files is cheap.
TINY = {
    "hidden_size": 32,
    "num_attention_heads": 2,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "kv_lora_rank": 16,
    "intermediate_size": 64,
    "vocab_size": 300,
    "num_hidden_layers": 1,
    "max_position_embeddings": 32,
}
EMB = "model.embed_tokens.weight"
UP = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def tiny_template(tmp_path_factory) -> str:
    return testing.make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m", seed=4, **TINY)


@pytest.fixture
def model_dir(tiny_template: str, tmp_path) -> str:
    """A fresh, valid copy of the tiny checkpoint that the test may break."""
    dst = str(tmp_path / "model")
    shutil.copytree(tiny_template, dst)
    return dst


@pytest.fixture
def sharded_dir(tmp_path) -> str:
    """A fresh tiny checkpoint in two shards (model.safetensors.index.json, SHARD_2 the second)."""
    cfg = testing.random_plm_config(**TINY)
    return testing.write_checkpoint(
        tmp_path / "sharded", cfg, testing.random_plm_weights(cfg, 4), shards=2
    )


SHARD_2 = "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def tiny_model(sl, tiny_template: str):
    return sl.load(tiny_template)


def _config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def _write_config(model_dir: str, cfg: dict) -> None:
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f)


def _st_path(model_dir: str) -> str:
    return os.path.join(model_dir, "model.safetensors")


def _weights() -> dict:
    cfg = testing.random_plm_config(**TINY)
    return testing.random_plm_weights(cfg, 4)


def _raises(sl, cls, model_dir: str, *needles: str, **load_kwargs):
    """sl.load(model_dir) raises ``cls`` (a class or a tuple), a SparselmError, whose message
    contains every needle. Returns the exception."""
    with pytest.raises(cls) as info:
        sl.load(model_dir, **load_kwargs)
    err = info.value
    assert isinstance(err, sl.SparselmError), type(err).__mro__
    msg = str(err)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in error message: {msg!r}"
    return err


# ----------------------------------------------------------------------------------------------
# the exception hierarchy
# ----------------------------------------------------------------------------------------------


def test_exception_hierarchy(sl) -> None:
    assert issubclass(sl.ModelIOError, sl.SparselmError) and issubclass(sl.ModelIOError, OSError)
    assert issubclass(sl.FormatError, sl.SparselmError) and issubclass(sl.FormatError, ValueError)
    for cls in (sl.ConfigError, sl.MissingTensorError, sl.ShapeError, sl.DtypeError):
        assert issubclass(cls, sl.FormatError)
    assert issubclass(sl.UnsupportedError, NotImplementedError)
    assert issubclass(sl.ContextLengthError, ValueError)
    assert issubclass(sl.InvalidArgumentError, ValueError)


# ----------------------------------------------------------------------------------------------
# directory and config.json
# ----------------------------------------------------------------------------------------------


def test_missing_directory(sl, tmp_path) -> None:
    missing = str(tmp_path / "does-not-exist")
    _raises(sl, sl.ModelIOError, missing, "does-not-exist")


def test_missing_config(sl, model_dir: str) -> None:
    os.remove(os.path.join(model_dir, "config.json"))
    _raises(sl, sl.ModelIOError, model_dir, "config.json")


def test_invalid_json_config(sl, model_dir: str) -> None:
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        f.write('{"model_type": "plm", "hidden_size": 64,,}')
    _raises(sl, sl.FormatError, model_dir, "config.json")


def test_config_not_an_object(sl, model_dir: str) -> None:
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        f.write("[1, 2, 3]")
    _raises(sl, sl.ConfigError, model_dir, "config.json")


def test_other_model_type(sl, model_dir: str) -> None:
    cfg = _config(model_dir)
    cfg["model_type"] = "llama"
    cfg["architectures"] = ["LlamaForCausalLM"]
    _write_config(model_dir, cfg)
    _raises(sl, (sl.ConfigError, sl.UnsupportedError), model_dir, "llama")


@pytest.mark.parametrize(
    "key,value",
    [
        ("hidden_size", -64),
        ("hidden_size", 0),
        ("num_attention_heads", 0),
        ("qk_rope_head_dim", 5),  # RoPE rotates pairs: the width must be even
        ("kv_lora_rank", 0),
        ("num_hidden_layers", -1),
        ("vocab_size", 0),
        ("rms_norm_eps", -1.0),
        ("hidden_size", "64"),  # wrong JSON type
        ("hidden_size", 64.5),
    ],
)
def test_invalid_config_values(sl, model_dir: str, key: str, value) -> None:
    cfg = _config(model_dir)
    cfg[key] = value
    _write_config(model_dir, cfg)
    _raises(sl, sl.ConfigError, model_dir, key)


def test_missing_config_field(sl, model_dir: str) -> None:
    cfg = _config(model_dir)
    del cfg["kv_lora_rank"]
    _write_config(model_dir, cfg)
    _raises(sl, sl.ConfigError, model_dir, "kv_lora_rank")


def test_unknown_config_keys_are_tolerated(sl, model_dir: str) -> None:
    cfg = _config(model_dir)
    cfg.update(
        {
            "rope_interleave": True,
            "head_dim": 4,
            "n_routed_experts": None,
            "some_future_key": {"a": [1, 2]},
        }
    )
    _write_config(model_dir, cfg)
    sl.load(model_dir)


def test_q_lora_rank_is_supported_or_rejected_clearly(sl, tmp_path) -> None:
    """docs §1: support DeepSeek-V2's low-rank query or reject it with UnsupportedError."""
    cfg = testing.random_plm_config(**TINY, q_lora_rank=12)
    w = testing.random_plm_weights(cfg, 6)
    path = testing.write_checkpoint(tmp_path / "qlora", cfg, w)
    try:
        model = sl.load(path)
    except sl.UnsupportedError as e:
        assert "q_lora_rank" in str(e)
        return
    ids = [5, 17, 200, 3, 99, 42]
    assert rel_err(model.logits(ids), reference.reference_logits(cfg, w, ids)) <= 1e-4


# ----------------------------------------------------------------------------------------------
# safetensors files
# ----------------------------------------------------------------------------------------------


def test_missing_weights_file(sl, model_dir: str) -> None:
    os.remove(_st_path(model_dir))
    _raises(sl, sl.ModelIOError, model_dir, "model.safetensors")


def test_truncated_mid_data(sl, model_dir: str) -> None:
    path = _st_path(model_dir)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    _raises(sl, sl.FormatError, model_dir, "model.safetensors")


def test_truncated_mid_header(sl, model_dir: str) -> None:
    path = _st_path(model_dir)
    _, start = testing.read_safetensors_header(path)
    with open(path, "r+b") as f:
        f.truncate(start // 2)
    _raises(sl, sl.FormatError, model_dir, "model.safetensors")


@pytest.mark.parametrize("size", [0, 5])
def test_file_shorter_than_the_length_prefix(sl, model_dir: str, size: int) -> None:
    with open(_st_path(model_dir), "r+b") as f:
        f.truncate(size)
    _raises(sl, sl.FormatError, model_dir, "model.safetensors")


def test_corrupt_header_json(sl, model_dir: str) -> None:
    path = _st_path(model_dir)
    blob = bytearray(Path(path).read_bytes())
    blob[8] = ord("[")  # the header no longer starts with '{'
    blob[9:14] = b"\xff\xfe!!!"  # and is not even UTF-8
    Path(path).write_bytes(bytes(blob))
    _raises(sl, sl.FormatError, model_dir, "model.safetensors")


def test_header_length_larger_than_file(sl, model_dir: str) -> None:
    path = _st_path(model_dir)
    blob = bytearray(Path(path).read_bytes())
    blob[:8] = struct.pack("<Q", len(blob) * 4)
    Path(path).write_bytes(bytes(blob))
    _raises(sl, sl.FormatError, model_dir, "model.safetensors")


def test_huge_header_length(sl, model_dir: str) -> None:
    """A header length near 2^64 must not overflow an addition or allocate."""
    path = _st_path(model_dir)
    blob = bytearray(Path(path).read_bytes())
    blob[:8] = struct.pack("<Q", 2**64 - 3)
    Path(path).write_bytes(bytes(blob))
    _raises(sl, sl.FormatError, model_dir, "model.safetensors")


def _rewrite_header(path: str, edit) -> None:
    header, start = testing.read_safetensors_header(path)
    data = Path(path).read_bytes()[start:]
    edit(header)
    testing.write_bytes_atomic(path, testing.pack_safetensors(header, data))


@pytest.mark.parametrize(
    "offsets",
    [
        lambda b, e, n: [b, n + 4],  # past the end of the data
        lambda b, e, n: [e, b],  # end before begin
        lambda b, e, n: [2**64 - 8, 2**64 - 4],  # overflow bait
        lambda b, e, n: [b, e - 4],  # fewer bytes than the shape needs
    ],
    ids=["past-end", "reversed", "overflow", "short"],
)
def test_data_offsets_out_of_range(sl, model_dir: str, offsets) -> None:
    """The message names the file and the tensor whose offsets are wrong (style.md: errors carry
    path/tensor/shape context), not just "invalid offset"."""
    path = _st_path(model_dir)

    def edit(header):
        n = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        b, e = header[UP]["data_offsets"]
        header[UP]["data_offsets"] = offsets(b, e, n)

    _rewrite_header(path, edit)
    _raises(sl, sl.FormatError, model_dir, "model.safetensors", UP)


def test_missing_tensor(sl, model_dir: str) -> None:
    w = _weights()
    del w[UP]
    testing.write_safetensors(_st_path(model_dir), w)
    err = _raises(sl, sl.MissingTensorError, model_dir, UP)
    assert isinstance(err, ValueError)


def test_wrong_shape(sl, model_dir: str) -> None:
    w = _weights()
    w[UP] = w[UP][:, :-1].copy()  # [64, 31] instead of [64, 32]
    testing.write_safetensors(_st_path(model_dir), w)
    err = _raises(sl, sl.ShapeError, model_dir, UP, "31")
    assert "32" in str(err)


def test_embedding_rows_must_match_vocab(sl, model_dir: str) -> None:
    w = _weights()
    w[EMB] = w[EMB][:-1].copy()
    testing.write_safetensors(_st_path(model_dir), w)
    _raises(sl, sl.ShapeError, model_dir, EMB, "299")


def test_unsupported_dtype_i32(sl, model_dir: str) -> None:
    w = _weights()
    w[UP] = np.ones(w[UP].shape, dtype=np.int32)
    testing.write_safetensors(_st_path(model_dir), w)
    _raises(sl, sl.DtypeError, model_dir, UP, "I32")


def test_f64_tensor_loads_or_raises_dtype_error(sl, model_dir: str) -> None:
    w = _weights()
    w[UP] = w[UP].astype(np.float64)
    testing.write_safetensors(_st_path(model_dir), w)
    try:
        model = sl.load(model_dir)
    except sl.DtypeError as e:
        assert UP in str(e) and "F64" in str(e)
        return
    cfg = _config(model_dir)
    ids = [1, 2, 3]
    assert rel_err(model.logits(ids), reference.reference_logits(cfg, _weights(), ids)) <= 1e-4


def test_unknown_dtype_string_in_file(sl, model_dir: str) -> None:
    _rewrite_header(_st_path(model_dir), lambda h: h[UP].update(dtype="Q7_WEIRD"))
    err = _raises(sl, sl.FormatError, model_dir, "model.safetensors")
    assert UP in str(err) or "Q7_WEIRD" in str(err), str(err)  # the tensor or the bad value


def test_missing_shard(sl, sharded_dir: str) -> None:
    os.remove(os.path.join(sharded_dir, SHARD_2))
    _raises(sl, sl.ModelIOError, sharded_dir, SHARD_2)


def test_index_without_weight_map(sl, sharded_dir: str) -> None:
    with open(os.path.join(sharded_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}}, f)
    _raises(sl, sl.FormatError, sharded_dir, "weight_map")


@pytest.mark.parametrize("shard", [".", "", "..", "sub/model.safetensors", "nul\x00.safetensors"])
def test_index_shard_names_must_be_plain_file_names(sl, sharded_dir: str, shard: str) -> None:
    index_path = os.path.join(sharded_dir, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["weight_map"][EMB] = shard
    with open(index_path, "w") as f:
        json.dump(index, f)
    _raises(sl, sl.FormatError, sharded_dir, "plain file name")


def test_shard_that_is_a_directory(sl, sharded_dir: str) -> None:
    shard = os.path.join(sharded_dir, SHARD_2)
    os.remove(shard)
    os.mkdir(shard)
    _raises(sl, sl.FormatError, sharded_dir, "not a regular file")


def test_unknown_load_dtype(sl, tiny_template: str) -> None:
    _raises(sl, (sl.InvalidArgumentError, sl.DtypeError), tiny_template, "f13", dtype="f13")


@pytest.mark.parametrize("threads", [-1, "two"])
def test_invalid_threads(sl, tiny_template: str, threads) -> None:
    with pytest.raises((sl.InvalidArgumentError, TypeError)):
        sl.load(tiny_template, threads=threads)


# ----------------------------------------------------------------------------------------------
# runtime arguments
# ----------------------------------------------------------------------------------------------


def test_prompt_longer_than_context(sl, tiny_model) -> None:
    n = TINY["max_position_embeddings"]
    too_long = [1] * (n + 1)
    with pytest.raises(sl.ContextLengthError) as info:
        tiny_model.logits(too_long)
    assert str(n) in str(info.value)
    with pytest.raises(sl.ContextLengthError):
        tiny_model.generate(too_long, max_new_tokens=1)
    sess = tiny_model.session()
    sess.feed([1] * n)
    with pytest.raises(sl.ContextLengthError):
        sess.feed([2])
    assert sess.n_past == n  # the failed feed changed nothing
    assert tiny_model.logits([1] * n).shape == (n, TINY["vocab_size"])  # exactly full is fine


@pytest.mark.parametrize("bad", [[300], [-1], [5, 10**12], [2**32 + 1]])
def test_token_ids_out_of_range(sl, tiny_model, bad) -> None:
    with pytest.raises(sl.InvalidArgumentError):
        tiny_model.logits(bad)
    with pytest.raises(sl.InvalidArgumentError):
        tiny_model.session().feed(bad)
    with pytest.raises(sl.InvalidArgumentError):
        tiny_model.generate(bad, max_new_tokens=1)


def test_empty_prompt(sl, tiny_model) -> None:
    """logits([]) is either an InvalidArgumentError or an empty [0, vocab] array."""
    try:
        out = tiny_model.logits([])
    except sl.InvalidArgumentError:
        return
    assert out.shape == (0, TINY["vocab_size"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 1.5},
        {"top_p": 0.0},
        {"top_p": -0.2},
        {"top_k": -1},
        {"min_p": -0.01},
        {"min_p": 1.01},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0},
        {"max_new_tokens": -1},
    ],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()),
)
def test_invalid_sampling_arguments(sl, tiny_model, kwargs) -> None:
    args = {"max_new_tokens": 2, "temperature": 1.0, "seed": 0}
    args.update(kwargs)
    for prompt in ([1, 2, 3], "Hello"):
        with pytest.raises(ValueError) as info:
            tiny_model.generate(prompt, **args)
        assert isinstance(info.value, sl.InvalidArgumentError), type(info.value)
        assert next(iter(kwargs)) in str(info.value)
    with pytest.raises(sl.InvalidArgumentError):
        tiny_model.chat([{"role": "user", "content": "hi"}], **args)


def test_invalid_attention_mode(sl, tiny_model) -> None:
    with pytest.raises(sl.InvalidArgumentError):
        tiny_model.session().feed([1, 2], attention="sparse")


def test_model_still_works_after_errors(sl, tiny_model, tiny_template: str) -> None:
    ids = [1, 2, 3, 4]
    cfg, w = reference.load_weights(tiny_template)
    want = reference.reference_logits(cfg, w, ids)
    for bad in ([-1], [10**6]):
        with pytest.raises(sl.SparselmError):
            tiny_model.logits(bad)
    assert rel_err(tiny_model.logits(ids), want) <= 1e-4


# ----------------------------------------------------------------------------------------------
# fuzz: mutated files load or raise a SparselmError, never crash
# ----------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@st.composite
def _mutation(draw, size: int, header_end: int):
    kind = draw(st.sampled_from(["truncate", "flip-header", "flip-any", "insert", "splice-json"]))
    if kind == "truncate":
        return kind, draw(st.integers(0, size - 1)), b""
    if kind in ("flip-header", "splice-json"):
        pos = draw(st.integers(0, header_end - 1))
    else:
        pos = draw(st.integers(0, size - 1))
    if kind == "splice-json":
        token = draw(
            st.sampled_from(
                [
                    b"9999999999999999999",
                    b"-1",
                    b"null",
                    b"[]",
                    b"{}",
                    b'"',
                    b"1e308",
                    b'"F64"',
                    b'"BF16"',
                    b"[0,0]",
                    b"18446744073709551615",
                ]
            )
        )
        return kind, pos, token
    data = draw(st.binary(min_size=1, max_size=8))
    return kind, pos, data


def _apply(blob: bytes, mutation) -> bytes:
    kind, pos, data = mutation
    if kind == "truncate":
        return blob[:pos]
    if kind == "insert":
        return blob[:pos] + data + blob[pos:]
    return blob[:pos] + data + blob[pos + len(data) :]


def test_fuzz_mutated_safetensors(sl, tiny_template: str, tmp_path) -> None:
    original = Path(_st_path(tiny_template)).read_bytes()
    _, header_end = testing.read_safetensors_header(original)
    work = str(tmp_path / "fuzz")
    shutil.copytree(tiny_template, work)
    target = _st_path(work)
    outcomes = {"loaded": 0, "raised": 0}

    @hypothesis.settings(
        max_examples=50,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(_mutation(len(original), header_end))
    def run(mutation) -> None:
        with open(target, "wb") as f:
            f.write(_apply(original, mutation))
        try:
            model = sl.load(work)
        except sl.SparselmError:
            outcomes["raised"] += 1
            return
        outcomes["loaded"] += 1
        out = model.logits([1, 2, 3])  # a model that loads must also run (NaNs are allowed)
        assert out.shape == (3, TINY["vocab_size"])

    run()
    print(f"[fuzz] {outcomes}")
    assert outcomes["raised"] > 0


# ----------------------------------------------------------------------------------------------
# files that are not what they claim to be (found by review): typed errors, no hang, no abort
# ----------------------------------------------------------------------------------------------


def test_fifo_shard_is_rejected_without_blocking(sl, sharded_dir: str) -> None:
    """Opening a FIFO for reading blocks until a writer comes: the loader must look first.
    Run in a child so that a regression fails on the timeout instead of hanging the suite."""
    shard = os.path.join(sharded_dir, SHARD_2)
    os.remove(shard)
    os.mkfifo(shard)
    code = (
        "import sys, sparselm\n"
        "try:\n"
        f"    sparselm.load({sharded_dir!r})\n"
        "except sparselm.FormatError as e:\n"
        "    print('FormatError', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.startswith("FormatError") and "not a regular file" in out.stdout


@pytest.mark.parametrize(
    "name,content",
    [
        ("config.json", b'{"a": "\xff\xfe"}'),
        ("config.json", b"[" * 100_000 + b"]" * 100_000),
        ("config.json", b'{"n": ' + b"9" * 5000 + b"}"),
        ("tokenizer_config.json", b'{"chat_template": "\xff"}'),
        ("generation_config.json", b'{"do_sample": false, "x": "\xc3"}'),
        ("generation_config.json", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("chat_template.jinja", b"{{ messages }}\xff"),
    ],
)
def test_malformed_text_files_are_format_errors(sl, model_dir: str, name: str, content: bytes):
    Path(model_dir, name).write_bytes(content)
    err = _raises(sl, sl.FormatError, model_dir)
    assert name in str(err), str(err)


def test_added_token_ids_must_be_ascii_decimals(sl, model_dir: str) -> None:
    p = Path(model_dir, "tokenizer_config.json")
    cfg = json.loads(p.read_text())
    cfg["added_tokens_decoder"] = {"²": {"content": "<x>", "special": True}}
    p.write_text(json.dumps(cfg))
    _raises(sl, sl.FormatError, model_dir, "added_tokens_decoder")


@pytest.mark.parametrize("eos", [2**63, 2**32 + 5, -1, [3, 2**40]])
@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_eos_ids_out_of_range_are_rejected(sl, model_dir: str, name: str, eos) -> None:
    """They were accepted, then broke every generate() (2**63) or were truncated onto a real
    token (2**32 + 5 stopped on token 5)."""
    p = Path(model_dir, name)
    cfg = json.loads(p.read_text()) if p.is_file() else {}
    cfg["eos_token_id"] = eos
    p.write_text(json.dumps(cfg))
    _raises(sl, sl.FormatError, model_dir, name, "eos_token_id")


@pytest.mark.parametrize(
    "component",
    [
        ("normalizer", {"type": "Precompiled", "precompiled_charsmap": "AAAA"}),
        ("pre_tokenizer", {"type": "FixedLength", "length": 0}),
    ],
)
def test_tokenizer_that_panics_is_a_format_error(sl, model_dir: str, component) -> None:
    """tokenizers panics (a BaseException) on these; the load must say which file is bad."""
    p = Path(model_dir, "tokenizer.json")
    tj = json.loads(p.read_text())
    tj[component[0]] = component[1]
    p.write_text(json.dumps(tj))
    _raises(sl, sl.FormatError, model_dir, "tokenizer.json")


def test_tokenizer_ids_beyond_the_model_vocab(sl, model_dir: str) -> None:
    p = Path(model_dir, "tokenizer.json")
    tj = json.loads(p.read_text())
    vocab = tj["model"]["vocab"]
    tok = next(t for t, i in vocab.items() if i > 100)
    vocab[tok] = 5000  # TINY's vocab_size is 300; the token count stays below it
    p.write_text(json.dumps(tj))
    _raises(sl, sl.FormatError, model_dir, "token id 5000", "vocab_size is 300")


def test_overlong_path_is_a_model_io_error(sl, tmp_path) -> None:
    _raises(sl, sl.ModelIOError, str(tmp_path / ("a" * 5000)))


def test_huge_context_caches_fail_cleanly(sl, tmp_path) -> None:
    """A tiny file can declare a context whose latent cache is terabytes: sessions must raise
    OutOfMemoryError (a Rust allocation failure used to abort the process), and logits() of a
    short prompt must not allocate the whole context at all."""
    cfg = testing.random_plm_config(
        hidden_size=2,
        num_attention_heads=1,
        qk_nope_head_dim=1,
        qk_rope_head_dim=2,
        v_head_dim=1,
        kv_lora_rank=16384,
        intermediate_size=2,
        vocab_size=300,
        num_hidden_layers=64,
        max_position_embeddings=1 << 20,
    )
    path = testing.write_checkpoint(tmp_path / "huge", cfg, testing.random_plm_weights(cfg, 1))
    model = sl.load(path)
    assert model.logits([1, 2, 3]).shape == (3, 300)
    with pytest.raises(sl.OutOfMemoryError, match="KV cache"):
        model.session()
    assert model.session(max_seq=64).generate([1, 2, 3], max_new_tokens=2)  # still usable


def test_native_engine_rejects_more_threads_than_the_machine_can_use(sl, tiny_template) -> None:
    # the core's own limit (the Python check in load() comes first); before, 100000 threads
    # were started (minutes)
    from sparselm import _native

    too_many = sl.max_threads() + 1
    with pytest.raises(sl.InvalidArgumentError, match="more than this machine can use"):
        _native.Engine(str(tiny_template), "auto", too_many)
    with pytest.raises(sl.InvalidArgumentError, match="more than this machine can use"):
        sl.load(tiny_template, threads=too_many)
