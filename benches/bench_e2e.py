"""End-to-end speed of sparselm on the exact PLM-1.8B shape (random weights).

Reports, per weight format and thread count: prefill tok/s (128-token prompt), decode tok/s with
exact sparsity on and off, achieved weight-read GB/s against the machine's read bandwidth
measured just before and after the decode (``read_gb_s``; it drifts between phases on shared
machines), peak RSS (before those reads), measured ReLU² sparsity, and the kernel tier. Each configuration runs in its own process so peak
RSS is its own. Results are printed as a table and written as JSON (``--json``).

    python benches/bench_e2e.py                       # f16/bf16, 1 and 2 threads
    python benches/bench_e2e.py --dtypes bf16 --threads 2 --decode 32

Timing belongs here, never in tests. The machine is shared and noisy: compare ratios measured
side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: Buffer of the plain reads that bracket every decode timing (``read_gb_s``): well above the
#: 32 MiB last-level cache of the reference machine (64 MiB read 18 % fast there).
READ_MIB = 256


def read_gb_s(threads: int) -> float:
    """The machine's read bandwidth right now (GB/s, median of 3 plain reads of ``READ_MIB``).

    The reference VM moves between ~33 and ~60 GB/s (2 threads) in phases of seconds to
    minutes, so decode timings are reported against the read measured just before and after
    them, not against a fixed figure.
    """
    from sparselm import _native

    return statistics.median(_native.read_bandwidth(threads, READ_MIB, 3))


def peak_rss_gb() -> float:
    """Peak RSS of this process so far, GB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def current_rss_gb() -> float:
    """RSS of this process now, GB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e9  # kB here means KiB
    except OSError:
        pass
    return 0.0


def run_one(model_dir: str, dtype: str, threads: int, prompt: int, decode: int) -> dict:
    import sparselm
    from sparselm import _native
    from sparselm.model import QUANTIZED_DTYPES
    from sparselm.testing import tensor_shapes

    t0 = time.perf_counter()
    eng = _native.Engine(model_dir, dtype, threads)
    load_s = time.perf_counter() - t0
    cfg = json.loads(Path(model_dir, "config.json").read_text())
    n_params = sum(math.prod(s) for s in tensor_shapes(cfg).values())
    ids = [(i * 7919) % (cfg["vocab_size"] - 200) + 100 for i in range(prompt)]
    sess = eng.new_session(prompt + decode + 8)
    # Warm-up, as llama.cpp gets in bench_llama: a short prompt and one decode step (first-use
    # costs such as page faults of scratch buffers stay out of the timings); then a fresh start.
    sess.start(ids[:8], 2)
    while sess.next_token() is not None:
        pass
    sess.reset()
    t0 = time.perf_counter()
    sess.start(ids, decode)
    prefill_s = time.perf_counter() - t0
    # Peak RSS before the bandwidth reads (their buffer is freed before decode starts).
    rss_gb = peak_rss_gb()
    bw0 = read_gb_s(threads)
    t0 = time.perf_counter()
    n = 0
    while sess.next_token() is not None:
        n += 1
    decode_s = time.perf_counter() - t0
    rss_gb = max(rss_gb, current_rss_gb())
    bw1 = read_gb_s(threads)
    st = sess.stats()
    wbytes = eng.weight_bytes
    d, ni, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    bpw = wbytes / n_params
    sparsity = st.get("mlp_sparsity", 0.0)
    sparse_on = os.environ.get("SPARSELM_DENSE_MLP", "0") in ("", "0")
    # Bytes read per generated token: the engine counts the W_down rows its decode skipped
    # (the planar int8 layout reads groups of 32 rows with many active neurons whole).
    skipped = st.get("down_bytes_skipped_per_token")
    if skipped is None:
        skipped = sparsity * layers * ni * d * bpw if sparse_on else 0.0
    read = wbytes - skipped
    # n tokens cost n - 1 forward passes (the first comes from the prompt's logits): rates and
    # bytes read are per forward pass, as llama.cpp's are counted in bench_llama.
    forwards = max(n - 1, 0)
    tok_s = forwards / decode_s if decode_s > 0 else 0.0
    return {
        "dtype": eng.dtype,
        "threads": eng.threads,
        "sparse": sparse_on,
        "load_s": load_s,
        "prefill_tok_s": prompt / prefill_s,
        "decode_tok_s": tok_s,
        "decode_tok_s_handed_out": n / decode_s if decode_s > 0 else 0.0,
        "decode_tokens": n,
        "gb_per_token": read / 1e9,
        "gb_s": read * tok_s / 1e9,
        "read_gb_s": [bw0, bw1],
        "bandwidth_share": read * tok_s / 1e9 / ((bw0 + bw1) / 2),
        "sparsity": sparsity,
        "peak_rss_gb": rss_gb,
        "tier": sparselm.kernel_tier(),
        "prompt_engine": sparselm.prompt_engine(),
        # the layout of the int8 down kernels: it applies to the quantized formats only
        "down_layout": sparselm.down_layout() if eng.dtype in QUANTIZED_DTYPES else "n/a",
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dtypes", default="bf16,f16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--model", help="a model directory instead of the PLM-1.8B-shaped checkpoint")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config as JSON
    a = ap.parse_args()
    from plm_checkpoint import ensure_checkpoint, write_atomic

    model_dir = a.model or str(ensure_checkpoint())
    if a.one:
        dtype, threads = a.one.split(":")
        print(json.dumps(run_one(model_dir, dtype, int(threads), a.prompt, a.decode)))
        return
    meta = {"cpu": platform.processor() or platform.machine(), **build_info()}
    print(
        f"sparselm from {meta['sparselm_module']} (native built {meta['native_mtime']} UTC, "
        f"commit {meta['commit']}{' + uncommitted changes' if meta['dirty'] else ''})",
        flush=True,
    )
    rows = []
    for dtype in a.dtypes.split(","):
        for threads in [int(t) for t in a.threads.split(",")]:
            for sparse in (True, False):
                env = dict(os.environ, SPARSELM_DENSE_MLP="0" if sparse else "1")
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--one",
                        f"{dtype}:{threads}",
                        "--prompt",
                        str(a.prompt),
                        "--decode",
                        str(a.decode),
                        "--model",
                        model_dir,
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if out.returncode != 0:
                    sys.stderr.write(out.stderr[-4000:])
                    raise SystemExit(f"the {dtype}:{threads} run failed (exit {out.returncode})")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(
                    f"{r['dtype']:>5} threads={r['threads']} sparse={'on ' if r['sparse'] else 'off'} "
                    f"prefill {r['prefill_tok_s']:6.2f} tok/s | decode {r['decode_tok_s']:5.2f} tok/s "
                    f"({r['gb_s']:5.1f} GB/s, {100 * r['bandwidth_share']:3.0f}% of a plain read: "
                    f"{r['read_gb_s'][0]:.0f}/{r['read_gb_s'][1]:.0f} GB/s) | "
                    f"sparsity {100 * r['sparsity']:4.1f}% | RSS {r['peak_rss_gb']:.2f} GB | "
                    f"load {r['load_s']:.1f}s | {r['tier']} | prompts {r['prompt_engine']} | "
                    f"down {r['down_layout']}",
                    flush=True,
                )
                if a.json:  # after every run: a later failure keeps what was measured
                    write_atomic(a.json, json.dumps({"meta": meta, "results": rows}, indent=2))


def build_info() -> dict:
    """What was timed: the sparselm module actually imported (the repository's python/ or an
    installed copy), its native library's modification time, and the repository's commit with a
    flag for uncommitted changes. A commit alone does not say which build ran."""
    import sparselm
    from sparselm import _native

    native = Path(_native.__file__).resolve()
    return {
        "commit": git_commit(),
        "dirty": git_dirty(),
        "sparselm_module": str(Path(sparselm.__file__).resolve().parent),
        "native_library": str(native),
        "native_mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(native.stat().st_mtime)),
    }


def git_dirty() -> bool | None:
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
