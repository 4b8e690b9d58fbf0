"""sparselm vs llama.cpp, side by side in one run, on the same PLM-1.8B-shaped random weights.

The checkpoint of ``benches/plm_checkpoint.py`` is exported once per format to GGUF
(``benches/gguf_export.py``; cached in the bench cache as ``gguf/<dir>-<hash>-<dtype>.gguf``,
re-exported when the checkpoint changes; about 3.7 / 1.9 / 1.0 GB for f16 / q8_0 / q4_0). Then, per format and thread count, one process at a
time (the machine is small and shared: never two timing processes at once):

  * llama.cpp through ``llama-cpp-python`` (``flash_attn=False``: llama.cpp's PLM path aborts
    with flash attention), after a short warm-up that touches every weight page;
  * sparselm with exact sparsity on and off (``SPARSELM_DENSE_MLP=1``: ``W_down`` kept for a
    dense GEMV and read whole every token, as a dense engine does: Q8_0/Q4_0 in the GEMV
    layout, float formats in column blocks of 2048), via ``bench_e2e``'s ``run_one`` in a child
    of this script (``--one-sparselm``).

Within a round the three runs take turns going first: round r (from 1) runs them in the order
llama.cpp, sparse on, sparse off rotated to start at the ((r - 1) mod 3)-th, so over 3k rounds
each runs first, second and last k times (the memory bandwidth drifts in phases, and a fixed
order would hand one engine the same slot every round; use a multiple of 3 for ``--rounds``).
Every result records its ``round`` and ``run_in_round`` (1-3), and the table says how often
each engine ran first.

Both sides run the same protocol: a prompt of ``--prompt`` token ids evaluated in one call
(prefill tok/s = prompt tokens / time), then greedy decoding of ``--decode`` tokens. The first
generated token comes from the prompt's logits, so ``--decode`` tokens cost ``--decode - 1``
single-token forward passes; "decode tok/s" is forward passes (+ greedy pick) per second on
both sides (as ``bench_e2e.py`` reports it).

    python benches/bench_llama.py --dtypes f16,q8_0,q4_0 --threads 2 --prompt 128 --decode 32
    python benches/bench_llama.py --dtypes q4_0 --threads 1,2 --json /tmp/llama.json
    python benches/bench_llama.py --dtypes q4_0 --rounds 3   # 3 rounds, rotated order, medians
    python benches/bench_llama.py --table /tmp/a.json,/tmp/b.json   # pool saved runs

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

Every timing child reports the sparselm it imported: its package directory, ``__version__``
(from the installed distribution's metadata, which names no build: a source tree on PYTHONPATH
reports the version pip installed), the SHA-256 of its native library and its kernel tier. The
first line printed and ``--json``'s ``meta.sparselm_imported`` say what ran; a WARNING is printed
(and ``meta.sparselm_from_repo`` is false) when it is not this repository's ``python/sparselm``,
e.g. a stale pip-installed copy: the commit printed describes the repository, not that copy.

``--table A.json,B.json`` pools the rounds of saved runs, and refuses (exit 2, naming the field)
files whose protocol differs: prompt or decode length, thread counts, the model (its config.json
and sampled weights, ``plm_checkpoint.model_identity``; the directory for files saved before
that was recorded), the GGUF size of a format. Formats may differ (each is pooled only with
itself), but a file sharing no format with the others is refused. Different builds of either
engine are pooled with a note (the README pools commits whose decode path is unchanged).

Prints one line per run, then a table of tok/s and the ratio sparselm / llama.cpp for prefill and
decode (sparse on and off), and the decode ratios among runs in the same bandwidth phase. Needs the optional packages ``gguf`` and ``llama-cpp-python``.
"""

from __future__ import annotations

import argparse
import hashlib
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
from collections.abc import Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_e2e import (  # on the path above
    build_info,
    current_rss_gb,
    peak_rss_gb,
    read_gb_s,
    run_one,
)

#: The repository's own package, next to benches/: what a run of this checkout should time.
REPO_PACKAGE = HERE.parent / "python" / "sparselm"

#: The three runs of a round, in the order ``--json`` stores them and the table shows them.
ENGINES = ("llama.cpp", "sparse on", "sparse off")


def round_order(rnd: int) -> list[int]:
    """Indices into ``ENGINES`` in the order round ``rnd`` (from 0) runs them: rotated to start
    at ``rnd mod 3``, so over 3k rounds each engine runs first, second and last k times."""
    return [(rnd + k) % len(ENGINES) for k in range(len(ENGINES))]


def imported_sparselm() -> dict:
    """Which sparselm this process imported: package directory, ``__version__`` (distribution
    metadata: names no build), native library path, the first 16 hex digits of its SHA-256 (the
    build identity) and modification time, and the kernel tier chosen. Each timing child returns
    it with its result (after timing), so the record says what ran, not what the parent saw."""
    import sparselm
    from sparselm import _native

    native = Path(_native.__file__).resolve()
    return {
        "module": str(Path(sparselm.__file__).resolve().parent),
        "version": sparselm.__version__,
        "native_library": str(native),
        "native_sha256": hashlib.sha256(native.read_bytes()).hexdigest()[:16],
        "native_mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(native.stat().st_mtime)),
        "kernel_tier": sparselm.kernel_tier(),
    }


def from_repo(ident: dict) -> bool:
    """Whether ``imported_sparselm()``'s package is this repository's ``python/sparselm``."""
    return Path(ident["module"]) == REPO_PACKAGE.resolve()


def describe_sparselm(ident: dict) -> str:
    return (
        f"sparselm {ident['version']} from {ident['module']} (native {ident['native_library']}, "
        f"sha256 {ident['native_sha256']}, built {ident['native_mtime']} UTC, "
        f"{ident['kernel_tier']})"
    )


def not_repo_warning(ident: dict, commit: str) -> str:
    """The warning for a run that imported a sparselm other than this repository's."""
    repo_native = [f for f in sorted(REPO_PACKAGE.glob("_native*")) if f.suffix in (".so", ".pyd")]
    if not repo_native:
        native = "this repository's native library is not built"
    elif hashlib.sha256(repo_native[0].read_bytes()).hexdigest()[:16] == ident["native_sha256"]:
        native = "its native library is byte-identical to this repository's; the Python may differ"
    else:
        native = "its native library differs from this repository's"
    return (
        f"WARNING: the sparselm imported is {ident['module']}, not this repository's "
        f"{REPO_PACKAGE.resolve()} ({native}): these timings are of that copy, not of commit "
        f"{commit}. To time this checkout, build it and put {REPO_PACKAGE.parent.resolve()} "
        "first on PYTHONPATH (or install it in place)."
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


def order_note(runs: list[tuple[dict, dict, dict]]) -> str:
    """How often each engine ran first in these rounds (rounds saved before the order was
    recorded ran llama.cpp, sparse on, sparse off)."""
    first = [0] * len(ENGINES)
    fixed = 0
    for run in runs:
        pos = [r.get("run_in_round") for r in run]
        if None in pos:
            fixed += 1
            first[0] += 1
        else:
            first[pos.index(1)] += 1
    note = ", ".join(f"{e} {n}" for e, n in zip(ENGINES, first))
    return note + (f"; {fixed} in the fixed order of older runs" if fixed else "")


def print_table(
    table: list[tuple[str, int, list[tuple[dict, dict, dict]]]],
    rows: list[dict],
    prompt: int,
    decode: int,
) -> None:
    """The summary table of a run (also rebuilt from saved ``--json`` runs by ``--table``)."""
    counts = sorted({len(runs) for _, _, runs in table})
    rounds = counts[-1]
    shown = str(rounds) if len(counts) == 1 else f"{counts[0]}-{rounds}"
    print()
    print(
        f"prompt {prompt} tokens, decode {decode} tokens (tok/s; ratio = sparselm / llama.cpp"
        + (
            f"; medians of {shown} alternating rounds; a ratio is the median of the per-round "
            "ratios, not the quotient of the medians shown, with their range in brackets)"
            if rounds > 1
            else ")"
        )
    )
    if rounds > 1:
        print(
            "(rounds in which each ran first: "
            + "; ".join(
                f"{dt} threads {th}, {len(runs)} rounds: {order_note(runs)}"
                for dt, th, runs in table
            )
            + ")"
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


class ProtocolMismatch(ValueError):
    """Saved runs that ``--table`` must not pool: the message names the field and the files."""


def _differ(field: str, values: Mapping[str, object]) -> None:
    """Raise ProtocolMismatch unless every file (name -> value) has the same ``field``."""
    if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
        shown = ", ".join(f"{name}: {v}" for name, v in values.items())
        raise ProtocolMismatch(f"the protocol differs in {field} ({shown})")


def _config_diff(configs: dict[str, dict]) -> dict[str, object]:
    """Per file, only the config.json keys whose values differ between the files."""
    keys = sorted({k for c in configs.values() for k in c})
    diff = [k for k in keys if len({json.dumps(c.get(k)) for c in configs.values()}) > 1]
    return {name: {k: c.get(k) for k in diff} for name, c in configs.items()}


def check_protocol(saved: dict[str, dict]) -> list[str]:
    """Refuse (ProtocolMismatch) to pool saved ``--json`` runs (file name -> contents) measured
    under different protocols; return notes on differences that pooling tolerates.

    Must match: prompt and decode lengths, the set of thread counts, the model (config.json and
    sampled weights from ``model_identity``; where a file predates that record, the model
    directory of all files), and llama.cpp's GGUF size per format. Formats may differ (a format
    is pooled only with itself) unless a file shares none with the others. Builds (sparselm,
    llama-cpp-python) and the CPU may differ, with a note.
    """
    metas = {name: sv["meta"] for name, sv in saved.items()}
    rows = {name: sv["results"] for name, sv in saved.items()}
    _differ("prompt length", {n: m["prompt"] for n, m in metas.items()})
    _differ("decode length", {n: m["decode"] for n, m in metas.items()})
    _differ("threads", {n: sorted({r["threads"] for r in rs}) for n, rs in rows.items()})
    idents = {n: m["model_identity"] for n, m in metas.items() if m.get("model_identity")}
    _differ("model config", _config_diff({n: i["config"] for n, i in idents.items()}))
    _differ("model weights", {n: i["weights"] for n, i in idents.items()})
    if len(idents) < len(metas):  # some saved before model_identity: compare the directories
        _differ("model (directory)", {n: m.get("model") for n, m in metas.items()})
    formats = {n: sorted({r["dtype"] for r in rs}) for n, rs in rows.items()}
    for dtype in sorted({d for ds in formats.values() for d in ds}):
        sizes = {
            n: sorted({r["gguf_bytes"] for r in rs if r["dtype"] == dtype and "gguf_bytes" in r})
            for n, rs in rows.items()
            if dtype in formats[n]
        }
        # files saved before the size was recorded have none to compare
        _differ(f"{dtype} GGUF bytes", {n: v for n, v in sizes.items() if v})
    notes = []
    if len(saved) > 1:
        for n, ds in formats.items():
            others = {d for m, dm in formats.items() if m != n for d in dm}
            if not others & set(ds):
                raise ProtocolMismatch(
                    f"the protocol differs in dtypes ({n} has {', '.join(ds)}, the others "
                    f"{', '.join(sorted(others))}: nothing to pool)"
                )
        everywhere = set.intersection(*(set(ds) for ds in formats.values()))
        for n, ds in formats.items():
            if set(ds) - everywhere:
                notes.append(f"{', '.join(sorted(set(ds) - everywhere))} only in some files ({n})")
    for field, get in (
        ("sparselm build", _build_of),
        ("llama-cpp-python", lambda m: m.get("llama_cpp_python")),
        ("cpu", lambda m: m.get("cpu")),
    ):
        values = {n: get(m) for n, m in metas.items()}
        if len({json.dumps(v) for v in values.values()}) > 1:
            notes.append(f"{field} differs: " + ", ".join(f"{n}: {v}" for n, v in values.items()))
    return notes


def _build_of(meta: dict) -> str:
    """The sparselm a saved run timed: the native library's hash where the children reported it,
    else the repository commit of the run (older files)."""
    ident = meta.get("sparselm_imported")
    if ident:
        return f"native sha256 {ident['native_sha256']}"
    return f"commit {meta.get('commit')}{'+dirty' if meta.get('dirty') else ''}"


class NotASavedRun(ValueError):
    """A ``--table`` file that is not a saved ``--json`` run (or holds no complete round)."""


def load_saved(files: list[str]) -> dict[str, dict]:
    """Saved ``--json`` runs by file name; ValueError for a file that is not one (or repeated)."""
    saved: dict[str, dict] = {}
    for f in files:
        try:
            sv = json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {f}: {e}") from e
        if not isinstance(sv, dict) or not isinstance(sv.get("meta"), dict):
            raise NotASavedRun(f"{f} is not a saved bench_llama run (no meta and results)")
        res = sv.get("results")
        if not isinstance(res, list) or not res or len(res) % 3:
            raise NotASavedRun(
                f"{f} holds no complete round (its results must be runs of llama.cpp, sparse "
                "on and sparse off, three per round)"
            )
        if not all(isinstance(r, dict) and {"dtype", "threads"} <= r.keys() for r in res):
            raise NotASavedRun(f"{f}: a result is not a saved run (no dtype and threads)")
        if not {"prompt", "decode"} <= sv["meta"].keys():
            raise NotASavedRun(f"{f}: its meta names no prompt and decode lengths")
        if f in saved:
            raise ValueError(f"{f} given twice")
        saved[f] = sv
    return saved


def pool_saved(
    saved: dict[str, dict],
) -> tuple[list[tuple[str, int, list[tuple[dict, dict, dict]]]], list[dict], list[str]]:
    """Pool the rounds of saved runs per (format, threads): the table, all results and the
    notes of ``check_protocol``, which raises ProtocolMismatch first if they must not pool."""
    notes = check_protocol(saved)
    res: list[dict] = []
    groups: dict[tuple[str, int], list[tuple[dict, dict, dict]]] = {}
    for sv in saved.values():
        r = sv["results"]
        res += r
        for i in range(0, len(r) - 2, 3):  # (llama.cpp, sparse on, sparse off) per round
            run = (r[i], r[i + 1], r[i + 2])
            groups.setdefault((run[1]["dtype"], run[1]["threads"]), []).append(run)
    pooled = [(dt, th, runs) for (dt, th), runs in groups.items()]
    return pooled, res, notes


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
    if not a.table and not a.one and not a.one_sparselm:
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
        "same-phase pairs; refused, exit 2, unless prompt and decode lengths, threads, model "
        "and GGUF sizes match) and exit",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: GGUF:THREADS, llama.cpp only
    ap.add_argument("--one-sparselm", help=argparse.SUPPRESS)  # internal: DTYPE:THREADS
    a = ap.parse_args()
    _check_args(ap, a)
    if a.table:
        try:
            saved = load_saved(a.table.split(","))
            pooled, res, notes = pool_saved(saved)
        except ValueError as e:  # ProtocolMismatch included
            ap.error(f"--table: {e}")
        for f, sv in saved.items():
            meta = sv["meta"]
            ident = meta.get("sparselm_imported")
            print(
                f"{f}: "
                + (describe_sparselm(ident) if ident else f"sparselm {meta.get('sparselm')}")
                + f", repository commit {meta.get('commit')}"
                + (" + uncommitted changes" if meta.get("dirty") else "")
                + (
                    ""
                    if meta.get("sparselm_from_repo", True)
                    else " (NOT this repository's python/sparselm)"
                )
            )
        for note in notes:
            print(f"note: {note}")
        meta = next(iter(saved.values()))["meta"]
        print_table(pooled, res, meta["prompt"], meta["decode"])
        return
    if a.one:  # a timing child: llama.cpp (sparselm only for the plain reads)
        path, threads = a.one.rsplit(":", 1)
        r = run_llama(path, int(threads), a.prompt, a.decode)
        print(json.dumps(dict(r, sparselm_imported=imported_sparselm())))
        return
    if a.one_sparselm:  # a timing child: sparselm (SPARSELM_DENSE_MLP set by the parent)
        dtype, threads = a.one_sparselm.split(":")
        r = run_one(a.model, dtype, int(threads), a.prompt, a.decode)
        print(json.dumps(dict(r, sparselm_imported=imported_sparselm())))
        return

    from gguf_export import ensure_gguf
    from plm_checkpoint import ensure_checkpoint, model_identity, write_atomic

    model_dir = a.model or str(ensure_checkpoint())
    import llama_cpp

    builds = {
        "llama_cpp_python": llama_cpp.__version__,
        **build_info(),  # the repository's commit and uncommitted changes; this process's import
    }
    commit = f"{builds['commit']}{' + uncommitted changes' if builds['dirty'] else ''}"
    # The children inherit this environment and should import the same sparselm, but each
    # reports its own (a rebuild of the native library mid-run would change it).
    mine = imported_sparselm()
    print(
        f"{describe_sparselm(mine)} | repository commit {commit} | "
        f"llama-cpp-python {builds['llama_cpp_python']}",
        flush=True,
    )
    if not from_repo(mine):
        print(not_repo_warning(mine, commit), file=sys.stderr, flush=True)
    dtypes = a.dtypes.split(",")
    thread_counts = [int(t) for t in a.threads.split(",")]
    meta = {
        "cpu": platform.processor() or platform.machine(),
        "prompt": a.prompt,
        "decode": a.decode,
        "dtypes": dtypes,
        "threads": thread_counts,
        "rounds": a.rounds,
        "engines": list(ENGINES),
        "order": "rotated: round r (from 1) runs the engines starting at the ((r - 1) mod 3)-th; "
        "each result has its round and run_in_round",
        "model": model_dir,
        "model_identity": model_identity(model_dir),
        "sparselm": mine["module"],  # this process's import (the children's: sparselm_imported)
        "sparselm_imported": mine,
        "sparselm_from_repo": from_repo(mine),
        **builds,
    }
    seen: list[dict] = []  # the distinct sparselm builds the children reported

    def check_child(r: dict) -> None:
        """The first child's sparselm is the record's; a child that imported another is flagged."""
        ident = r["sparselm_imported"]
        if ident in seen:
            return
        seen.append(ident)
        if len(seen) == 1:
            meta["sparselm_imported"] = ident
            meta["sparselm_from_repo"] = from_repo(ident)
            if ident != mine:
                print(
                    f"WARNING: the timing children import {describe_sparselm(ident)}, not what "
                    f"this process imported ({describe_sparselm(mine)})",
                    file=sys.stderr,
                    flush=True,
                )
                if not from_repo(ident):
                    print(not_repo_warning(ident, commit), file=sys.stderr, flush=True)
        else:
            meta["sparselm_changed_during_run"] = seen[1:]
            print(
                "WARNING: sparselm changed during the run (rebuilt?): a child now imports "
                f"{describe_sparselm(ident)}",
                file=sys.stderr,
                flush=True,
            )

    rows: list[dict] = []
    table: list[tuple[str, int, list[tuple[dict, dict, dict]]]] = []
    for dtype in dtypes:
        gguf_file = str(ensure_gguf(model_dir, dtype))
        for threads in thread_counts:
            common = ["--prompt", str(a.prompt), "--decode", str(a.decode)]
            runs: list[tuple[dict, dict, dict]] = []
            for rnd in range(a.rounds):
                tag = f" round {rnd + 1}" if a.rounds > 1 else ""
                got: dict[int, dict] = {}
                for pos, engine in enumerate(round_order(rnd)):
                    if engine == 0:
                        r = _subprocess_json(
                            [sys.executable, __file__, "--one", f"{gguf_file}:{threads}", *common]
                        )
                        r["dtype"] = dtype
                    else:
                        sparse = engine == 1
                        env = dict(os.environ, SPARSELM_DENSE_MLP="0" if sparse else "1")
                        r = _subprocess_json(
                            [
                                sys.executable,
                                __file__,
                                "--one-sparselm",
                                f"{dtype}:{threads}",
                                *common,
                                "--model",
                                model_dir,
                            ],
                            env=env,
                        )
                        r["engine"] = "sparselm"  # decode_tok_s: forward passes/s (run_one)
                    r["round"], r["run_in_round"] = rnd + 1, pos + 1
                    check_child(r)
                    print(_run_line(r, dtype, threads) + tag, flush=True)
                    got[engine] = r
                run = (got[0], got[1], got[2])  # stored in ENGINES order whatever ran first
                rows += run
                runs.append(run)
                if a.json:  # after every round: a later failure keeps what was measured
                    write_atomic(a.json, json.dumps({"meta": meta, "results": rows}, indent=2))
            table.append((dtype, threads, runs))

    print_table(table, rows, a.prompt, a.decode)
    if not meta["sparselm_from_repo"]:  # again: the first warning scrolled away long ago
        print(not_repo_warning(meta["sparselm_imported"], commit), file=sys.stderr)
    if len(seen) > 1:
        print("WARNING: sparselm changed during the run (see above)", file=sys.stderr)


def _run_line(r: dict, dtype: str, threads: int) -> str:
    """The line printed after one timing run."""
    others = f"others used {100 * r['other_cpu_share']:.0f}% CPU"
    if r["engine"] == "llama.cpp":
        return (
            f"llama.cpp {dtype:>5} threads={threads}          "
            f"prefill {r['prefill_tok_s']:6.2f} tok/s | "
            f"decode {r['decode_tok_s']:5.2f} tok/s (read {_bw(r)}) | "
            f"RSS {r['peak_rss_gb']:.2f} GB | load {r['load_s']:.1f}s | {others}"
        )
    return (
        f"sparselm  {dtype:>5} threads={threads} sparse={'on ' if r['sparse'] else 'off'} "
        f"prefill {r['prefill_tok_s']:6.2f} tok/s | "
        f"decode {r['decode_tok_s']:5.2f} tok/s (read {_bw(r)}) | "
        f"RSS {r['peak_rss_gb']:.2f} GB | sparsity {100 * r['sparsity']:4.1f}% | "
        f"{r['tier']}, prompts {r.get('prompt_engine', '?')}, down {r.get('down_layout', '?')} | "
        f"{others}"
    )


if __name__ == "__main__":
    main()
