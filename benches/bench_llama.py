"""sparselm vs llama.cpp, side by side in one run, on the same PLM-1.8B-shaped random weights.

The checkpoint of ``benches/plm_checkpoint.py`` is exported once per format to GGUF
(``benches/gguf_export.py``; cached in the bench cache as ``gguf/<dir>-<hash>-<dtype>.gguf``,
re-exported when the checkpoint changes; about 3.7 / 1.9 / 1.0 GB for f16 / q8_0 / q4_0). Then, per format and thread count, one process at a
time (the machine is small and shared: never two timing processes at once):

  * llama.cpp through ``llama-cpp-python`` (``flash_attn=False``: llama.cpp's PLM path aborts
    with flash attention), after a short warm-up that touches every weight page;
  * sparselm with exact sparsity on and off (``SPARSELM_DENSE_MLP=1``: ``W_down`` kept for a
    dense GEMV and read whole every token, as a dense engine does: Q8_0/Q4_0 in the GEMV
    layout, float formats in column blocks of 2048), via ``bench_e2e.py --one`` (its
    ``run_one``).

Both sides run the same protocol: a prompt of ``--prompt`` token ids evaluated in one call
(prefill tok/s = prompt tokens / time), then greedy decoding of ``--decode`` tokens. The first
generated token comes from the prompt's logits, so ``--decode`` tokens cost ``--decode - 1``
single-token forward passes; "decode tok/s" is forward passes (+ greedy pick) per second on
both sides (as ``bench_e2e.py`` reports it).

    python benches/bench_llama.py --dtypes f16,q8_0,q4_0 --threads 2 --prompt 128 --decode 32
    python benches/bench_llama.py --dtypes q4_0 --threads 1,2 --json /tmp/llama.json
    python benches/bench_llama.py --dtypes q4_0 --rounds 3   # alternate 3 times, medians

Each timing child starts only once other processes use < 15 % of the CPUs (llama.cpp's spinning
thread pool collapses on oversubscribed cores), and every result records the CPU share others
used while it ran ("others used N% CPU"); a run disturbed by more than 8 % is repeated (up to 4
runs, the least disturbed is kept).

Both sides also time a plain read of memory (``sparselm.memory_bandwidth``'s probe) just before
and just after their decode: this machine's bandwidth moves between phases (~33 and ~60 GB/s
with 2 threads), and one side may decode in the fast phase, the other in the slow one.

On CPUs with Intel AMX, build llama-cpp-python without its AMX path, e.g.
``CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" pip install llama-cpp-python``:
0.3.36's AMX-INT8 kernels crash (SIGSEGV in ``ggml_backend_amx_mul_mat``) on PLM's Q4_0/Q8_0
weights. Its AVX-512 kernels and Q4_0 repacking stay on. Each result records llama.cpp's
``system_info`` (``AMX_INT8 = 1`` when the AMX path is compiled in).

Prints one line per run, then a table of tok/s and the ratio sparselm / llama.cpp for prefill and
decode (sparse on and off), and the decode ratios among runs in the same bandwidth phase. Needs the optional packages ``gguf`` and ``llama-cpp-python``.
"""

from __future__ import annotations

import argparse
import importlib.util
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

from bench_e2e import (  # on the path above
    build_info,
    current_rss_gb,
    peak_rss_gb,
    read_gb_s,
)


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    """The prompt of bench_e2e.run_one (same ids on both sides)."""
    return [(i * 7919) % (vocab_size - 200) + 100 for i in range(n)]


def run_llama(gguf_file: str, threads: int, prompt: int, decode: int) -> dict:
    """Time llama.cpp on one GGUF: prefill of ``prompt`` ids, then ``decode`` greedy tokens."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(
        model_path=gguf_file,
        n_ctx=prompt + decode + 8,
        n_batch=max(prompt, 32),
        n_ubatch=max(prompt, 32),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        flash_attn=False,  # llama.cpp's PLM graph aborts with flash attention
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    ids = prompt_ids(llm.n_vocab(), prompt)

    # Warm-up: a short prompt touches every weight page of the memory-mapped file (and builds
    # the graph once); then the cache is emptied. sparselm's weights are resident after load.
    llm.eval(ids[:8])
    llm.eval([ids[8]])
    llm.reset()

    t0 = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t0
    rss_gb = peak_rss_gb()  # before the bandwidth reads, as in bench_e2e.run_one
    bw0 = read_gb_s(threads)

    # Greedy decode, same protocol as sparselm's session: the first token comes from the prompt's
    # logits; every later one needs one forward pass of the previous token.
    t0 = time.perf_counter()
    tok = int(np.argmax(_last_logits(llm)))
    out = [tok]
    while len(out) < decode:
        llm.eval([tok])
        tok = int(np.argmax(_last_logits(llm)))
        out.append(tok)
    decode_s = time.perf_counter() - t0
    rss_gb = max(rss_gb, current_rss_gb())
    bw1 = read_gb_s(threads)
    forwards = max(len(out) - 1, 1)
    info = llama_cpp.llama_print_system_info()
    llm.close()
    return {
        "engine": "llama.cpp",
        "dtype": Path(gguf_file).stem.rsplit("-", 1)[-1],
        "threads": threads,
        "load_s": load_s,
        "prefill_tok_s": prompt / prefill_s,
        "decode_tok_s": forwards / decode_s,
        "decode_tokens": len(out),
        "peak_rss_gb": rss_gb,
        "read_gb_s": [bw0, bw1],
        "gguf_bytes": os.path.getsize(gguf_file),
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": info.decode() if isinstance(info, bytes) else str(info),
    }


def _last_logits(llm):  # llama_cpp.Llama (an optional import)
    """Logits of the last evaluated token, read from the context (with ``logits_all=False``
    llama-cpp-python does not copy them into ``scores``)."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))


def _cpu_busy_s() -> float:
    """CPU-seconds spent busy by the whole machine so far (all cores, from /proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(x) for x in f.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_quiet(threshold: float = 0.15, max_wait_s: float = 900.0) -> float:
    """Wait until other processes use less than ``threshold`` of the CPUs (2-s samples).

    The machine is shared and llama.cpp's spinning thread pool collapses when cores are
    oversubscribed, so a timing run only starts on a quiet machine. Returns the last sample.
    """
    t_end = time.monotonic() + max_wait_s
    ncpu = os.cpu_count() or 1
    while True:
        b0, t0 = _cpu_busy_s(), time.monotonic()
        time.sleep(2.0)
        load = (_cpu_busy_s() - b0) / ((time.monotonic() - t0) * ncpu)
        if load < threshold or time.monotonic() > t_end:
            return load
        print(f"  (machine busy: others use {100 * load:.0f}% of the CPUs; waiting)", flush=True)
        time.sleep(10.0)


def _subprocess_json(cmd: list[str], env: dict | None = None, attempts: int = 4) -> dict:
    """Run one timing child on a quiet machine; its JSON result gains ``other_cpu_share``: the
    share of all CPUs that other processes used while it ran (0 = nobody disturbed it). A run
    disturbed by more than 8 % is repeated (up to ``attempts`` runs; the least disturbed is kept).
    """
    best: dict | None = None
    for i in range(attempts):
        r = _run_child(cmd, env)
        if best is None or r["other_cpu_share"] < best["other_cpu_share"]:
            best = r
        if r["other_cpu_share"] <= 0.08:
            break
        if i + 1 < attempts:
            print(
                f"  (disturbed: others used {100 * r['other_cpu_share']:.0f}% CPU; rerunning)",
                flush=True,
            )
    assert best is not None
    return best


def _llama_has_amx() -> bool:
    """Whether the installed llama.cpp was compiled with its AMX-INT8 path."""
    try:
        import llama_cpp

        info = llama_cpp.llama_print_system_info()
    except (ImportError, OSError, AttributeError):  # the hint is best effort
        return False
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "AMX_INT8 = 1" in text


def _run_child(cmd: list[str], env: dict | None) -> dict:
    wait_quiet()
    b0, c0, t0 = _cpu_busy_s(), _children_cpu_s(), time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.monotonic() - t0
    other = (_cpu_busy_s() - b0) - (_children_cpu_s() - c0)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        hint = ""
        if "--one" in cmd and out.returncode < 0 and _llama_has_amx():
            hint = (
                " (this llama.cpp build has AMX_INT8 on, whose kernels crash on PLM's Q4_0/Q8_0"
                " weights: rebuild llama-cpp-python without AMX, see this script's docstring)"
            )
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}{hint}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["other_cpu_share"] = max(0.0, other / (wall * (os.cpu_count() or 1)))
    return r


def _bw(r: dict) -> str:
    """The plain reads around a run's decode, GB/s."""
    return "/".join(f"{x:.0f}" for x in r["read_gb_s"]) + " GB/s"


def _phases(rows: list[dict]) -> float | None:
    """The read bandwidth that separates the machine's slow and fast phases in this run: the
    geometric middle of the 20th percentile and the highest plain read, if the highest is over
    1.3× the percentile (else None: one phase). The percentile, not the lowest read, so that a
    read taken while others used the memory cannot drag the cut into the slow phase (the
    midpoint of the lowest and highest put it at 32 GB/s when one read was 7 GB/s)."""
    reads = sorted(g for r in rows for g in r["read_gb_s"])
    lo, hi = reads[len(reads) // 5], reads[-1]
    return math.sqrt(lo * hi) if hi > 1.3 * lo else None


def _weight_gb_s(r: dict) -> float | None:
    """Weight bytes the run's decode read per second: sparselm reports it (bytes skipped by
    sparsity left out); for llama.cpp, the GGUF file's bytes per forward pass."""
    if "gb_s" in r:
        return float(r["gb_s"])
    if "gguf_bytes" in r:
        return r["gguf_bytes"] * r["decode_tok_s"] / 1e9
    return None


def _phase(r: dict, cut: float | None) -> str:
    """ "slow" / "fast" if both reads around the run's decode fall on one side of ``cut``, and
    for "slow" the decode did not read its weights faster than 1.1× the faster of those reads
    (else part of it ran in the fast phase between them: "mixed")."""
    reads = r["read_gb_s"]
    if cut is None:
        return "slow"
    if max(reads) < cut:
        gb_s = _weight_gb_s(r)
        return "mixed" if gb_s is not None and gb_s > 1.1 * max(reads) else "slow"
    if min(reads) > cut:
        return "fast"
    return "mixed"


def print_table(
    table: list[tuple[str, int, list[tuple[dict, dict, dict]]]],
    rows: list[dict],
    prompt: int,
    decode: int,
    rounds: int,
) -> None:
    """The summary table of a run (also rebuilt from a saved ``--json`` by ``--table``)."""
    print()
    print(
        f"prompt {prompt} tokens, decode {decode} tokens (tok/s; ratio = sparselm / llama.cpp"
        + (
            f"; medians of {rounds} alternating rounds; a ratio is the median of the per-round "
            "ratios, not the quotient of the medians shown, with their range in brackets)"
            if rounds > 1
            else ")"
        )
    )
    print(
        "(same phase: median decode tok/s of sparselm over that of llama.cpp among the runs whose "
        "plain reads before and after the decode were both in the slow (fast) bandwidth phase, "
        "slow runs also reading their weights at most 1.1x as fast as the faster of those reads, "
        "with the run counts; '-' where a side has none)"
    )
    cut = _phases(rows)
    if cut is not None:
        print(f"(slow / fast phase: plain reads below / above {cut:.0f} GB/s)")
    print(
        "| format | threads | prefill llama.cpp | prefill sparselm | ratio | decode llama.cpp "
        "| decode sparselm, sparse on | ratio | same phase: slow / fast "
        "| decode sparselm, sparse off | ratio | same phase: slow / fast "
        "| read GB/s | others' CPU share (max) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype, threads, runs in table:
        med = [
            {
                k: statistics.median(run[i][k] for run in runs)
                for k in ("prefill_tok_s", "decode_tok_s")
            }
            for i in range(3)
        ]
        ll, on, off = med

        def ratios(i: int, key: str, runs: list[tuple[dict, dict, dict]] = runs) -> str:
            # the median ratio, and with several rounds the range of the per-round ratios
            rs = [run[i][key] / run[0][key] for run in runs if run[0][key] > 0]
            if not rs:
                return "-"
            if len(rs) == 1:
                return f"{rs[0]:.2f}x"
            return f"{statistics.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})"

        def same_phase(i: int, runs: list[tuple[dict, dict, dict]] = runs) -> str:
            out = []
            for ph in ("slow", "fast"):
                ll_ = [run[0]["decode_tok_s"] for run in runs if _phase(run[0], cut) == ph]
                sp_ = [run[i]["decode_tok_s"] for run in runs if _phase(run[i], cut) == ph]
                if ll_ and sp_:
                    r = statistics.median(sp_) / statistics.median(ll_)
                    out.append(f"{r:.2f}x ({len(sp_)} vs {len(ll_)})")
                else:
                    out.append("-")
            return " / ".join(out)

        others = max(x["other_cpu_share"] for run in runs for x in run)
        reads = [g for run in runs for x in run for g in x["read_gb_s"]]
        print(
            f"| {dtype} | {threads} | {ll['prefill_tok_s']:.1f} | {on['prefill_tok_s']:.1f} | "
            f"{ratios(1, 'prefill_tok_s')} | {ll['decode_tok_s']:.2f} | "
            f"{on['decode_tok_s']:.2f} | {ratios(1, 'decode_tok_s')} | {same_phase(1)} | "
            f"{off['decode_tok_s']:.2f} | {ratios(2, 'decode_tok_s')} | {same_phase(2)} | "
            f"{min(reads):.0f}-{max(reads):.0f} | {100 * others:.0f}% |"
        )


def _check_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse what would crash a child or give meaningless numbers, before any long work."""
    if a.prompt < 9:
        ap.error("--prompt must be at least 9 (llama.cpp's warm-up evaluates 9 ids)")
    if a.decode < 2:
        ap.error("--decode must be at least 2 (the first token comes from the prompt's logits)")
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    try:
        threads = [int(t) for t in a.threads.split(",")]
    except ValueError:
        threads = [0]
    if min(threads) < 1:
        ap.error(f"--threads must be positive integers, got {a.threads!r}")
    from gguf_export import DTYPES

    bad = [d for d in a.dtypes.split(",") if d not in DTYPES]
    if bad:
        ap.error(f"--dtypes: {', '.join(bad)} not among {', '.join(DTYPES)}")
    if not a.table and not a.one:
        missing = [m for m in ("gguf", "llama_cpp") if importlib.util.find_spec(m) is None]
        if missing:
            raise SystemExit(
                f"bench_llama needs {' and '.join(missing)}: pip install '.[bench]' "
                "(gguf and llama-cpp-python, pinned in pyproject.toml)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dtypes", default="f16,q8_0,q4_0")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternate llama.cpp / sparse on / sparse off this many times per format; the "
        "table gives medians and the range of the per-round ratios (the machine's memory "
        "bandwidth drifts between runs)",
    )
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--model", help="a PLM checkpoint directory instead of the PLM-1.8B-shaped one")
    ap.add_argument(
        "--table",
        metavar="JSON[,JSON...]",
        help="print the table of saved --json runs (several: their rounds pooled, e.g. for more "
        "same-phase pairs; same prompt and decode lengths) and exit",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: GGUF:THREADS, llama.cpp only
    a = ap.parse_args()
    _check_args(ap, a)
    if a.table:
        saved = [json.loads(Path(f).read_text()) for f in a.table.split(",")]
        lengths = {(sv["meta"]["prompt"], sv["meta"]["decode"]) for sv in saved}
        if len(lengths) != 1:
            raise SystemExit(f"--table: runs with different prompt/decode lengths: {lengths}")
        res: list[dict] = []
        groups: dict[tuple[str, int], list[tuple[dict, dict, dict]]] = {}
        for sv in saved:
            r = sv["results"]
            res += r
            for i in range(0, len(r) - 2, 3):  # (llama.cpp, sparse on, sparse off) per round
                run = (r[i], r[i + 1], r[i + 2])
                groups.setdefault((run[1]["dtype"], run[1]["threads"]), []).append(run)
        pooled = [(dt, th, runs) for (dt, th), runs in groups.items()]
        rounds = max(len(r) for _, _, r in pooled)
        (prompt, decode) = lengths.pop()
        print_table(pooled, res, prompt, decode, rounds)
        return
    if a.one:
        path, threads = a.one.rsplit(":", 1)
        print(json.dumps(run_llama(path, int(threads), a.prompt, a.decode)))
        return

    from gguf_export import ensure_gguf
    from plm_checkpoint import ensure_checkpoint, write_atomic

    model_dir = a.model or str(ensure_checkpoint())
    import llama_cpp
    import sparselm

    # The children inherit this environment, so they import the same sparselm as this process.
    builds = {
        "sparselm": str(Path(sparselm.__file__).parent),
        "llama_cpp_python": llama_cpp.__version__,
        **build_info(),  # which native library, built when; commit and uncommitted changes
    }
    print(
        f"sparselm from {builds['sparselm']} (native built {builds['native_mtime']} UTC, "
        f"commit {builds['commit']}{' + uncommitted changes' if builds['dirty'] else ''}) | "
        f"llama-cpp-python {builds['llama_cpp_python']}",
        flush=True,
    )
    rows: list[dict] = []
    table: list[tuple[str, int, list[tuple[dict, dict, dict]]]] = []
    meta = {
        "cpu": platform.processor() or platform.machine(),
        "prompt": a.prompt,
        "decode": a.decode,
        "model": model_dir,
        **builds,
    }
    for dtype in a.dtypes.split(","):
        gguf_file = str(ensure_gguf(model_dir, dtype))
        for threads in [int(t) for t in a.threads.split(",")]:
            common = ["--prompt", str(a.prompt), "--decode", str(a.decode)]
            runs: list[tuple[dict, dict, dict]] = []
            for rnd in range(max(a.rounds, 1)):
                tag = f" round {rnd + 1}" if a.rounds > 1 else ""
                ll = _subprocess_json(
                    [sys.executable, __file__, "--one", f"{gguf_file}:{threads}", *common]
                )
                ll["dtype"] = dtype
                print(
                    f"llama.cpp {dtype:>5} threads={threads}          prefill {ll['prefill_tok_s']:6.2f} tok/s | "
                    f"decode {ll['decode_tok_s']:5.2f} tok/s (read {_bw(ll)}) | RSS {ll['peak_rss_gb']:.2f} GB | "
                    f"load {ll['load_s']:.1f}s | others used {100 * ll['other_cpu_share']:.0f}% CPU{tag}",
                    flush=True,
                )
                sp = {}
                for sparse in (True, False):
                    env = dict(os.environ, SPARSELM_DENSE_MLP="0" if sparse else "1")
                    r = _subprocess_json(
                        [
                            sys.executable,
                            str(HERE / "bench_e2e.py"),
                            "--one",
                            f"{dtype}:{threads}",
                            *common,
                            "--model",
                            model_dir,
                        ],
                        env=env,
                    )
                    r["engine"] = "sparselm"  # decode_tok_s: forward passes/s (run_one)
                    sp[sparse] = r
                    print(
                        f"sparselm  {dtype:>5} threads={threads} sparse={'on ' if sparse else 'off'} "
                        f"prefill {r['prefill_tok_s']:6.2f} tok/s | decode {r['decode_tok_s']:5.2f} tok/s (read {_bw(r)}) | "
                        f"RSS {r['peak_rss_gb']:.2f} GB | sparsity {100 * r['sparsity']:4.1f}% | {r['tier']}, prompts {r.get('prompt_engine', '?')}, down {r.get('down_layout', '?')} | "
                        f"others used {100 * r['other_cpu_share']:.0f}% CPU{tag}",
                        flush=True,
                    )
                rows += [ll, sp[True], sp[False]]
                runs.append((ll, sp[True], sp[False]))
                if a.json:  # after every round: a later failure keeps what was measured
                    write_atomic(a.json, json.dumps({"meta": meta, "results": rows}, indent=2))
            table.append((dtype, threads, runs))

    print_table(table, rows, a.prompt, a.decode, a.rounds)


if __name__ == "__main__":
    main()
