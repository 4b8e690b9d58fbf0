"""One greedy generate through the Python API; prints a JSON line (run by .ci/arm64.sh).

Runs unchanged in the x86_64 host Python and in Debian's arm64 CPython under qemu-aarch64, so
the two outputs can be compared: the NEON tier is bit-identical to the AVX2 tier (see
rust/core/src/kernels/mod.rs, PERF NOTES), so greedy ids must match the host with
SPARSELM_KERNEL=avx2.

usage: python smoke.py MODEL_DIR
"""

import json
import platform
import sys

import sparselm

model = sparselm.load(sys.argv[1])
result = {
    "machine": platform.machine(),
    "tier": sparselm.kernel_tier(),
    "ids": model.generate([1, 2, 3], max_new_tokens=4, temperature=0),
    "text": model.generate("Hello there", max_new_tokens=12, temperature=0),
}
print(json.dumps(result))
