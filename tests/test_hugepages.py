"""Weights land on transparent huge pages (sparselm_core::alloc), and SPARSELM_HUGEPAGES=0
keeps them off. Each case runs in a fresh interpreter: the switch is read once per process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sparselm.testing import make_tiny_checkpoint

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

_CHILD = r"""
import sys, sparselm

def anon_huge_kb():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0

before = anon_huge_kb()
m = sparselm.load(sys.argv[1], dtype="f32")
m.logits([1, 2, 3])  # touch the weights
print(anon_huge_kb() - before)
"""


def _thp_mode() -> str:
    try:
        text = THP.read_text()
    except OSError:
        return "absent"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "absent"


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    # an f32 embedding of 4096 x 512 = 8 MiB: four whole huge pages
    d = str(tmp_path_factory.mktemp("big") / "m")
    make_tiny_checkpoint(
        d,
        seed=5,
        hidden_size=512,
        intermediate_size=1024,
        num_attention_heads=2,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        kv_lora_rank=32,
        vocab_size=4096,
        num_hidden_layers=1,
        max_position_embeddings=64,
    )
    return d


def _huge_kb(model_dir: str, **env: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, model_dir],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or _thp_mode() not in ("always", "madvise"),
    reason="transparent huge pages are not available on this system",
)
def test_weights_on_huge_pages_and_opt_out(big_model: str) -> None:
    on = _huge_kb(big_model)
    off = _huge_kb(big_model, SPARSELM_HUGEPAGES="0")
    # The embedding alone is 8 MiB; the kernel may still fall back to small pages under memory
    # fragmentation, so ask for at least one 2 MiB page of it.
    assert on >= 2048, f"{on} KiB of huge pages after loading"
    if _thp_mode() == "madvise":
        assert off == 0, f"SPARSELM_HUGEPAGES=0 still gave {off} KiB of huge pages"
