"""One model shared by several Python threads: each thread's session decodes concurrently
(the GIL is released) and gets exactly what it gets alone. The decode step's thread team
serves one region at a time, so concurrent callers take turns instead of corrupting each
other's work."""

from __future__ import annotations

import io
import os
import subprocess
import sys
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


_FORK_SCRIPT = r"""
import multiprocessing as mp, os, sys
import sparselm

m = sparselm.load(threads=2)
want = m.generate("Once upon a time", max_new_tokens=12)
sess = m.session()
sess.generate("Once upon", max_new_tokens=3)

def child(q):
    # the parent's threads do not exist here: the model starts this process's own
    q.put((m.generate("Once upon a time", max_new_tokens=12), m.logits([11, 12]).shape))

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    got, shape = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0, p.exitcode
    assert got == want, (got, want)
    assert shape == (2, m.vocab_size), shape
    # a child that never uses the model and ends normally (interpreter finalization drops the
    # model: the parent's threads must not be waited for there)
    pid = os.fork()
    if pid == 0:
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # and a child that uses a session made in the parent
    pid = os.fork()
    if pid == 0:
        out = sess.generate("", max_new_tokens=2)
        os._exit(0 if isinstance(out, str) else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # the parent still decodes as before
    assert m.generate("Once upon a time", max_new_tokens=12) == want
    print("ok")
"""


def _run_script(tmp_path: Path, name: str, source: str) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a script in a fresh Python that imports this sparselm (at most 120 s)."""
    script = tmp_path / name
    script.write_text(source)
    env = dict(os.environ)
    pkg = str(Path(sparselm.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg, env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, str(script)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_a_forked_child_can_use_the_model(tmp_path: Path) -> None:
    # Before, the child's first forward pass waited forever for the parent's worker threads.
    r = _run_script(tmp_path, "fork_child.py", _FORK_SCRIPT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


_SIGINT_SCRIPT = r"""
import os, signal, sys, tempfile, threading, time
import sparselm
from sparselm.testing import make_tiny_checkpoint
# Python's own Ctrl-C handler even if this test run started with SIGINT ignored (a background
# job of a script): a child inherits that, and Python then installs none
signal.signal(signal.SIGINT, signal.default_int_handler)

d = make_tiny_checkpoint(tempfile.mkdtemp() + "/m", seed=1, hidden_size=512, num_hidden_layers=4,
    intermediate_size=2048, num_attention_heads=8, kv_lora_rank=128, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=2048)
m = sparselm.load(d)
ids = [i % 400 + 3 for i in range(1500)]
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    m.logits(ids)  # the process's first array-returning call
    time.sleep(5)  # (if the call ended before the signal, it lands here)
    print("no interrupt")
except KeyboardInterrupt:
    print("KeyboardInterrupt")
except BaseException as e:
    print(type(e).__name__)
# still usable
print(m.logits(ids[:4]).shape == (4, m.vocab_size))
"""


def test_ctrl_c_during_the_first_logits_call_is_a_keyboard_interrupt(tmp_path: Path) -> None:
    # Before, rust-numpy looked NumPy's C API up on first use, where the pending signal fired
    # and was unwrapped: a PanicException (a BaseException no handler catches).
    r = _run_script(tmp_path, "sigint.py", _SIGINT_SCRIPT)
    assert r.stdout.split("\n")[:2] == ["KeyboardInterrupt", "True"], r.stdout + r.stderr


_INTERRUPT_SCRIPT = r"""
import os, signal, tempfile, threading, time
import numpy as np
import sparselm
from sparselm.testing import make_tiny_checkpoint
# Python's own Ctrl-C handler even if this test run started with SIGINT ignored (a background
# job of a script): a child inherits that, and Python then installs none
signal.signal(signal.SIGINT, signal.default_int_handler)

def ckpt(layers):
    return make_tiny_checkpoint(tempfile.mkdtemp() + "/m", seed=1, hidden_size=512,
        num_hidden_layers=layers, intermediate_size=2048, num_attention_heads=8,
        kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_position_embeddings=2048)

m = sparselm.load(ckpt(4))
ids = [i % 400 + 3 for i in range(2000)]  # a prompt of ~1 s here

def interrupted(call):
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        call()
        time.sleep(5)  # (if the call ended before the signal, it lands here)
        return "no interrupt"
    except KeyboardInterrupt:
        return "KeyboardInterrupt"

s = m.session()
print("feed", interrupted(lambda: s.feed(ids)), s.n_past)
# nothing of the stopped prompt is cached: the next feed gives a fresh model's logits
print("after", np.array_equal(s.feed(ids[:5]), m.logits(ids[:5])[-1]))
s.reset()
print("generate", interrupted(lambda: s.generate(ids, max_new_tokens=1)), s.n_past)
print("then", s.generate(ids[:5], max_new_tokens=4) == m.generate(ids[:5], max_new_tokens=4))
# a stopped continuation leaves the session as it was, the last returned (pending) id included
ref = m.session()
for x in (s, ref):
    x.reset()
    x.generate(ids[:5], max_new_tokens=3)
before = s.tokens
r1 = interrupted(lambda: s.generate(ids[5:1500], max_new_tokens=1))
r2 = interrupted(lambda: s.feed(ids[5:1500]))
same = s.tokens == before
same_reply = s.generate(ids[5:9], max_new_tokens=4) == ref.generate(ids[5:9], max_new_tokens=4)
print("continuation", r1, r2, same, same_reply, s.tokens == ref.tokens)  # (pending id fed)
# one layer: a Ctrl-C during the last layer stops the prompt too
one = sparselm.load(ckpt(1)).session()
print("one layer", interrupted(lambda: one.feed(ids)), one.n_past,
      interrupted(lambda: one.generate(ids, max_new_tokens=1)), one.n_past)
# a handler that does not raise runs during the call, which goes on to the end; the session
# is busy there (a handler waiting for the call it interrupted would wait forever)
seen = []
def handler(*a):
    try:
        seen.append(s.n_past)
    except sparselm.SessionBusyError as e:
        seen.append(type(e).__name__)
signal.signal(signal.SIGINT, handler)
s.reset()
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
s.feed(ids)
print("handler", seen, s.n_past)
"""


def test_ctrl_c_stops_a_long_prompt_and_leaves_the_session_usable(tmp_path: Path) -> None:
    # Before, a prompt ran to its end (seconds to minutes on PLM-1.8B) and Ctrl-C landed after
    # it, with the whole prompt cached. The prompts here run 1-5 s on this machine: the signal
    # (at 0.2 s) lands while they run.
    r = _run_script(tmp_path, "interrupt.py", _INTERRUPT_SCRIPT)
    assert r.stdout.split("\n")[:7] == [
        "feed KeyboardInterrupt 0",
        "after True",
        "generate KeyboardInterrupt 0",
        "then True",
        "continuation KeyboardInterrupt KeyboardInterrupt True True True",
        "one layer KeyboardInterrupt 0 KeyboardInterrupt 0",
        "handler ['SessionBusyError'] 2000",
    ], r.stdout + r.stderr


def _progress_ckpt(tmp_path: Path) -> str:
    return make_tiny_checkpoint(tmp_path / "m", seed=3, num_hidden_layers=3)


def test_load_reports_progress_and_raises_what_the_callback_raises(tmp_path: Path) -> None:
    from sparselm import _native

    d = _progress_ckpt(tmp_path)
    calls: list[tuple[int, int]] = []
    _native.Engine(d, "q4_0", 1, progress=lambda done, total: calls.append((done, total)))
    # one call at least (the last, when the load has ended), moving forward only. (This load
    # takes ~1 ms: a callback stopping it midway is tested in the Rust core with stop_after.)
    assert calls and calls[-1][0] == calls[-1][1] > 0, calls
    assert calls == sorted(set(calls)), calls

    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        raise Stop(f"{done}/{total}")

    try:
        _native.Engine(d, "q4_0", 1, progress=stop)
    except Stop:
        pass
    else:
        raise AssertionError("the callback's exception was not raised")
    # nothing is left half-done: the next load works
    assert _native.Engine(d, "q4_0", 1).vocab_size > 0


def test_load_progress_bar(tmp_path: Path, capsys) -> None:
    d = _progress_ckpt(tmp_path)
    sparselm.load(d, progress=True)
    err = capsys.readouterr().err
    assert "loading m" in err and "tensor" in err, err
    sparselm.load(d, progress=False)
    sparselm.load(d)  # None: not a terminal here, so no bar
    assert capsys.readouterr().err == ""
    try:
        sparselm.load(d, progress="yes")  # type: ignore[arg-type]
    except sparselm.InvalidArgumentError as e:
        assert "progress must be None, True or False" in str(e)
    else:
        raise AssertionError("progress='yes' was accepted")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_load_progress_bar_on_a_terminal_waits_a_second(monkeypatch) -> None:
    # progress=None draws on a terminal only for loads over a second; the bundled model loads
    # in milliseconds. (Before, the finished bar was drawn anyway and never erased.)
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    sparselm.load()
    assert term.getvalue() == ""
    sparselm.load(progress=True)
    assert "tensor" in term.getvalue()
