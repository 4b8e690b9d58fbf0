"""Evaluate a PLM checkpoint with sparselm on held-out text: perplexity, top-1 agreement with
the f32 run, and measured ReLU² activation sparsity (per layer and mean).

    python tools/eval_model.py                         # the bundled model, its validation.txt
    python tools/eval_model.py DIR --text file.txt --dtypes f32,bf16 --window 256 --json out.json

Perplexity is exp(mean NLL) over non-overlapping windows of `--window` tokens (each window a
fresh context; the first token of a window is not scored).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def evaluate(model_dir: str, text: str, dtypes: list[str], window: int, max_tokens: int) -> dict:
    import sparselm
    from sparselm import _native

    tok = sparselm.Tokenizer.from_dir(model_dir)
    ids = tok.encode(text)[:max_tokens]
    windows = [ids[i : i + window] for i in range(0, len(ids) - 1, window)]
    windows = [w for w in windows if len(w) > 1]
    out: dict = {"model": str(model_dir), "tokens": sum(len(w) - 1 for w in windows), "window": window,
                 "tier": sparselm.kernel_tier(), "results": {}}
    ref_top1: list[np.ndarray] = []
    for dtype in dtypes:
        eng = _native.Engine(str(model_dir), dtype, 0)
        nll, n, agree, zeros = 0.0, 0, 0, None
        for wi, w in enumerate(windows):
            sess = eng.new_session(len(w))
            logits = np.asarray(sess.feed(w, "auto", True))
            lp = _log_softmax(logits[:-1])
            tgt = np.asarray(w[1:])
            nll -= float(lp[np.arange(len(tgt)), tgt].sum())
            n += len(tgt)
            top1 = logits.argmax(axis=-1)
            if dtype == dtypes[0]:
                ref_top1.append(top1)
            else:
                agree += int((top1 == ref_top1[wi]).sum())
            st = sess.stats()
            ls = np.asarray(st["layer_sparsity"]) * len(w)
            zeros = ls if zeros is None else zeros + ls
        n_tok = sum(len(w) for w in windows)
        layer = (zeros / n_tok).tolist()
        out["results"][dtype] = {
            "perplexity": math.exp(nll / n),
            "top1_agreement_vs_" + dtypes[0]: (agree / n_tok) if dtype != dtypes[0] else 1.0,
            "mean_sparsity": float(np.mean(layer)),
            "layer_sparsity": layer,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="model directory (default: the bundled model)")
    ap.add_argument("--text", help="held-out text file (default: MODEL/validation.txt)")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=200_000)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    import sparselm

    model = Path(a.model) if a.model else sparselm.bundled_model_path()
    text = Path(a.text or model / "validation.txt").read_text(encoding="utf-8")
    r = evaluate(str(model), text, a.dtypes.split(","), a.window, a.max_tokens)
    print(f"{r['model']}: {r['tokens']} scored tokens, window {r['window']}, tier {r['tier']}")
    for dt, v in r["results"].items():
        agree = next(x for k, x in v.items() if k.startswith("top1"))
        print(f"  {dt:>5}: perplexity {v['perplexity']:.3f} | top-1 agreement {100 * agree:.2f}% | "
              f"sparsity mean {100 * v['mean_sparsity']:.1f}% per layer "
              + " ".join(f"{100 * s:.1f}" for s in v["layer_sparsity"]))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    sys.exit(main())
