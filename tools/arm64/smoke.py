"""Greedy generate + prompt logits through the Python API; prints one JSON line.

Run by .ci/arm64.sh unchanged in the x86_64 host Python and in Debian's arm64 CPython under
qemu-aarch64. The NEON tiers are bit-identical to the AVX2 tier and the quantized kernels to the
scalar spec (rust/core/src/kernels/mod.rs, PERF NOTES), and neon-dotprod's 16-row int8 kernels
to the x86 ones, so with SPARSELM_KERNEL=avx2 on the host and QEMU_CPU=cortex-a76 on the arm64
side every field must match exactly, including the SHA-256 of the float32 logits bytes (for
QEMU_CPU=cortex-a72, plain neon, the host needs SPARSELM_INTERLEAVE=0 as well).

usage: python smoke.py MODEL_DIR|bundled [OUT.npz]   (OUT.npz: the logits, to diff on a mismatch)
("bundled" loads the plm-tiny model shipped inside the wheel.)
"""

import hashlib
import json
import platform
import sys

import numpy as np
import sparselm

model_dir = None if sys.argv[1] == "bundled" else sys.argv[1]
model = sparselm.load(model_dir)
result = {
    "machine": platform.machine(),
    "tier": sparselm.kernel_tier(),
    "ids": model.generate([1, 2, 3], max_new_tokens=4, temperature=0),
    "text": model.generate("The quick brown fox", max_new_tokens=16, temperature=0),
}
prompt = [(7 * i + 3) % 200 + 1 for i in range(40)]
saved = {}
for dtype in ("auto", "bf16", "f16", "q8_0", "q4_0"):
    m = model if dtype == "auto" else sparselm.load(model_dir, dtype=dtype)
    logits = np.ascontiguousarray(m.logits(prompt), dtype=np.float32)
    saved[dtype] = logits
    result[f"logits_sha256_{dtype}"] = hashlib.sha256(logits.tobytes()).hexdigest()[:16]
if len(sys.argv) > 2:
    np.savez(sys.argv[2], **saved)
print(json.dumps(result))
