"""One model shared by several Python threads: each thread's session decodes concurrently
(the GIL is released) and gets exactly what it gets alone. The decode step's thread team
serves one region at a time, so concurrent callers take turns instead of corrupting each
other's work."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import sparselm
from sparselm.testing import make_tiny_checkpoint


def _greedy(m, prompt: list[int], n: int) -> list[int]:
    s = m.session()
    logits = s.feed(prompt)
    out = []
    for _ in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        logits = s.feed([t])
    return out


def test_threads_decoding_one_model_concurrently(tmp_path: Path) -> None:
    d = make_tiny_checkpoint(
        tmp_path / "m",
        seed=11,
        hidden_size=128,
        intermediate_size=512,
        num_attention_heads=8,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        kv_lora_rank=64,
        vocab_size=500,
        num_hidden_layers=2,
        max_position_embeddings=128,
    )
    prompts = [[1, 2, 3, 4], [9, 8, 7], [100, 200, 300, 400, 5], [42]]
    for dtype in ("f32", "q8_0"):
        m = sparselm.load(d, dtype=dtype, threads=2)
        want = [_greedy(m, p, 40) for p in prompts]
        got: list[list[int] | None] = [None] * len(prompts)
        errors: list[BaseException] = []

        def run(i: int, m=m, got=got, errors=errors) -> None:
            try:
                got[i] = _greedy(m, prompts[i], 40)
            except BaseException as e:  # noqa: BLE001 - re-raised by the assert below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert got == want, dtype
