"""The ``sparselm`` command line: ``generate``, ``chat`` and ``info``.

Owns argument parsing, printing (text to stdout as it is generated, statistics and errors to
stderr) and exit codes: 0 success, 1 a sparselm error (bad model files, ...), 2 a usage error
(bad option values), 130 Ctrl-C. Errors are reported as ``sparselm: error: <message>`` without a
traceback. Everything else is delegated to the public Python API.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from ._errors import InvalidArgumentError, SparselmError
from .generation import GenerationConfig, GenerationStats
from .model import (
    DTYPES,
    QUANTIZED_DTYPES,
    Model,
    bundled_model_path,
    down_layout,
    kernel_tier,
    load,
    prompt_engine,
)

__all__ = ["build_parser", "main"]

PROG = "sparselm"

_SAMPLING_OPTIONS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
)


class UsageError(Exception):
    """A command-line usage problem found after argparse (exit code 2)."""


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def _unescape(text: str) -> str:
    """Interpret \\n, \\t, \\r and \\\\ in a --stop value (shells make real newlines awkward)."""
    out = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "ntr\\":
            out.append({"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        "-m",
        metavar="PATH",
        help="model directory (alternative to the MODEL_DIR argument; default: the bundled model)",
    )
    g.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="weight format in memory (default: auto)"
    )
    g.add_argument(
        "--threads", type=int, metavar="N", help="worker threads (default: one per physical core)"
    )
    g.add_argument(
        "--max-seq",
        type=int,
        metavar="N",
        help="context length of the KV cache (default: the model's max_position_embeddings)",
    )


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "generation (defaults: the model's generation_config.json, else greedy)"
    )
    g.add_argument("--max-new-tokens", type=int, metavar="N", help="at most N new tokens")
    g.add_argument("--temperature", type=float, metavar="T", help="0 = greedy; > 0 samples")
    g.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass (1: off)")
    g.add_argument("--min-p", type=float, metavar="P", help="min probability ratio (0: off)")
    g.add_argument(
        "--repetition-penalty", type=float, metavar="R", help="penalty on repeats (1: off)"
    )
    g.add_argument("--seed", type=int, metavar="S", help="sampler seed (reproducible sampling)")
    g.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="stop string, repeatable; \\n, \\t, \\r and \\\\ are unescaped",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--stats", action="store_true", help="also print MLP sparsity and detailed timings"
    )
    o.add_argument(
        "--quiet", "-q", action="store_true", help="print no statistics or progress bar on stderr"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``sparselm`` command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run PLM-architecture language models (MLA + squared-ReLU MLP) on CPUs.",
        epilog="Without MODEL_DIR or --model, the small model bundled with sparselm is used.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    gen = sub.add_parser(
        "generate",
        help="continue a prompt, streaming the text",
        description="Continue PROMPT and print the completion as it is generated. With one "
        "positional argument it is the prompt; with two, the model directory and the prompt. "
        "PROMPT '-' reads the prompt from standard input.",
        usage=f"{PROG} generate [options] [MODEL_DIR] PROMPT",
    )
    gen.add_argument("positionals", nargs="*", metavar="[MODEL_DIR] PROMPT", help=argparse.SUPPRESS)
    gen.add_argument(
        "--chat",
        action="store_true",
        help="wrap PROMPT in the chat template as a user message (for instruct models)",
    )
    gen.add_argument("--system", metavar="TEXT", help="system message (implies --chat)")
    _add_model_options(gen)
    _add_sampling_options(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser(
        "chat",
        help="interactive multi-turn chat",
        description="Chat with the model: one user message per line on standard input. "
        "Commands: /reset (forget the conversation), /exit (or end of input).",
        usage=f"{PROG} chat [options] [MODEL_DIR]",
    )
    chat.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="model directory")
    chat.add_argument("--system", metavar="TEXT", help="system message of the conversation")
    _add_model_options(chat)
    _add_sampling_options(chat)
    chat.set_defaults(func=cmd_chat)

    info = sub.add_parser(
        "info",
        help="show the model's config, dtype, kernel tier and size",
        usage=f"{PROG} info [options] [MODEL_DIR]",
    )
    info.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="model directory")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    _add_model_options(info)
    info.set_defaults(func=cmd_info)
    return parser


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _pick_model_dir(positional: str | None, option: str | None) -> str | None:
    if positional is not None and option is not None:
        raise UsageError("give the model either as MODEL_DIR or with --model, not both")
    return positional if positional is not None else option


def _split_generate_positionals(args: argparse.Namespace) -> tuple[str | None, str]:
    """(model_dir, prompt) from ``generate [MODEL_DIR] PROMPT`` and ``--model``."""
    pos: list[str] = list(args.positionals)
    if len(pos) > 2:
        raise UsageError(
            f"expected [MODEL_DIR] PROMPT, got {len(pos)} arguments (quote the prompt)"
        )
    if len(pos) == 2:
        model_dir, prompt = _pick_model_dir(pos[0], args.model), pos[1]
    elif len(pos) == 1:
        model_dir, prompt = args.model, pos[0]
    else:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("the PROMPT argument is required (or pipe it on standard input)")
        model_dir, prompt = args.model, "-"
    if prompt == "-":
        prompt = sys.stdin.read() if sys.stdin is not None else ""
    if not prompt:
        raise UsageError("the prompt is empty")
    return model_dir, prompt


def _load(model_dir: str | None, args: argparse.Namespace) -> Model:
    # a bar on a terminal for loads over a second (PLM-1.8B), none with --quiet
    progress = False if getattr(args, "quiet", False) else None
    return load(
        model_dir, dtype=args.dtype, threads=args.threads, max_seq=args.max_seq, progress=progress
    )


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = {name: getattr(args, name) for name in _SAMPLING_OPTIONS}
    if kw["stop"] is not None:
        kw["stop"] = [_unescape(s) for s in kw["stop"]]
    return kw


def _write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()


def _stream(pieces: Iterator[str], out: TextIO) -> str:
    last = ""
    for piece in pieces:
        _write(out, piece)
        last = piece or last
    return last


def _format_stats(stats: GenerationStats | None, detailed: bool) -> list[str]:
    if not stats:
        return []
    lines = [
        f"prompt: {stats['prompt_tokens']} tokens"
        + (
            f" ({stats['prompt_eval_tokens']} evaluated)"
            if stats["prompt_eval_tokens"] != stats["prompt_tokens"]
            else ""
        )
        + f", {stats['prompt_tok_s']:.1f} tok/s | generated: {stats['completion_tokens']} "
        f"tokens, {stats['decode_tok_s']:.1f} tok/s | finish: {stats['finish_reason']}"
    ]
    if detailed:
        sparsity = stats.get("mlp_sparsity")
        lines.append(
            "mlp sparsity: "
            + (
                f"{100 * sparsity:.1f}% of ReLU² neurons are zero"
                if sparsity is not None
                else "n/a"
            )
        )
        layers = stats.get("layer_sparsity")
        if layers:
            lines.append("layer sparsity: " + " ".join(f"{100 * x:.0f}%" for x in layers))
        skipped = stats.get("down_bytes_skipped_per_token")
        dense = stats.get("weight_bytes_per_token_dense")
        if skipped is not None and dense:
            lines.append(
                f"weights skipped: {skipped / 1e6:.2f} MB of {dense / 1e6:.2f} MB per token "
                f"({100 * skipped / dense:.1f}%)"
            )
        lines.append(
            f"time: prompt {stats['prompt_seconds'] * 1e3:.1f} ms, "
            f"decode {stats['decode_seconds'] * 1e3:.1f} ms"
        )
    return lines


def _print_stats(model: Model, args: argparse.Namespace, err: TextIO) -> None:
    if args.quiet:
        return
    for line in _format_stats(model.last_stats, args.stats):
        print(f"[{line}]", file=err, flush=True)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    """``sparselm generate``: stream a completion of the prompt."""
    model_dir, prompt = _split_generate_positionals(args)
    kw = _sampling_kwargs(args)
    GenerationConfig().replace(**kw)  # fail on bad options before loading anything
    model = _load(model_dir, args)
    out = sys.stdout
    if args.chat or args.system is not None:
        messages = [{"role": "user", "content": prompt}]
        if args.system is not None:
            messages.insert(0, {"role": "system", "content": args.system})
        pieces = model.chat(messages, stream=True, **kw)
    else:
        pieces = model.generate(prompt, stream=True, **kw)
    last = _stream(pieces, out)
    if not last.endswith("\n"):
        _write(out, "\n")
    _print_stats(model, args, sys.stderr)
    return 0


_CHAT_HELP = (
    "commands: /reset forgets the conversation, /exit quits (so does end of input); "
    "Ctrl-C stops a reply"
)


def _read_line(interactive: bool) -> str | None:
    """One line of input without its newline, or None at end of input."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def cmd_chat(args: argparse.Namespace) -> int:
    """``sparselm chat``: an interactive multi-turn conversation on one session."""
    model_dir = _pick_model_dir(args.model_dir, args.model)
    kw = _sampling_kwargs(args)
    GenerationConfig().replace(**kw)
    model = _load(model_dir, args)
    session = model.session()
    stdin = sys.stdin
    interactive = stdin is not None and stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        print(f"sparselm chat ({_CHAT_HELP})", file=sys.stderr)
    if stdin is None:
        return 0
    out = sys.stdout
    while True:
        line = _read_line(interactive)
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd = text.split()[0].lower()
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                session.reset()
                print("[conversation reset]", file=sys.stderr, flush=True)
            elif cmd == "/help":
                print(_CHAT_HELP, file=sys.stderr, flush=True)
            else:
                print(f"unknown command {cmd}; {_CHAT_HELP}", file=sys.stderr, flush=True)
            continue
        messages: list[dict[str, str]] = [{"role": "user", "content": line}]
        if not session.history and args.system is not None:
            messages.insert(0, {"role": "system", "content": args.system})
        pieces: Iterator[str] | None = None
        try:
            pieces = session.chat(messages, stream=True, **kw)
            last = _stream(pieces, out)
        except KeyboardInterrupt:
            if not interactive:
                raise
            # Ctrl-C during a reply (its prompt or its tokens) ends that reply only; at the
            # input prompt it ends the chat. The session keeps what was shown of the reply.
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
            _write(out, "\n")
            print("[reply interrupted]", file=sys.stderr, flush=True)
            continue
        except SparselmError as exc:
            # A turn that does not fit must not end the whole conversation.
            print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
            if not interactive:
                # the exit codes of main(): a rejected argument (the template refusing the
                # messages, say) is a usage error, as in the native CLI
                return 2 if isinstance(exc, InvalidArgumentError) else 1
            print("[use /reset to start over]", file=sys.stderr, flush=True)
            continue
        if not last.endswith("\n"):
            _write(out, "\n")
        _print_stats(model, args, sys.stderr)
    return 0


def _architectures(model: Model) -> list[str]:
    """``architectures`` of the checkpoint's config.json (the engine keeps only the fields it
    validates), or [] if the file cannot be read or has none."""
    found = model.config.get("architectures")
    if not found and model.path is not None:
        try:
            with open(os.path.join(model.path, "config.json"), encoding="utf-8") as f:
                found = json.load(f).get("architectures")
        except (OSError, ValueError, AttributeError):
            found = None
    if not isinstance(found, (list, tuple)):
        return []
    return [str(a) for a in found]


def _info_dict(model: Model) -> dict[str, Any]:
    try:
        tier: str | None = kernel_tier()
        engine: str | None = prompt_engine()
        layout: str | None = down_layout()
    except ImportError:
        tier = engine = layout = None
    gc = model.generation_config
    return {
        "path": str(model.path) if model.path else None,
        "bundled": model.path is not None and model.path == bundled_model_path().resolve(),
        "model_type": model.config.get("model_type"),
        "architectures": _architectures(model),
        "num_parameters": model.num_parameters,
        "dtype": model.dtype,
        "threads": model.threads,
        "kernel_tier": tier,
        "prompt_gemm": model.prompt_gemm,
        "prompt_engine": engine,
        # the layout applies to the quantized formats' down projection only (null otherwise)
        "down_layout": layout if model.dtype in QUANTIZED_DTYPES else None,
        "context_length": model.context_length,
        "vocab_size": model.vocab_size,
        "tokenizer_vocab_size": model.tokenizer.vocab_size,
        "stop_token_ids": list(model.stop_token_ids),
        "chat_template": model.tokenizer.chat_template is not None,
        "generation_config": gc.to_dict(),
        "config": model.config.to_dict(),
    }


def cmd_info(args: argparse.Namespace) -> int:
    """``sparselm info``: describe a model."""
    model = _load(_pick_model_dir(args.model_dir, args.model), args)
    info = _info_dict(model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    n = info["num_parameters"]
    gc = model.generation_config
    sampling = (
        "greedy"
        if gc.greedy
        else f"temperature {gc.temperature:g}, top_k {gc.top_k}, top_p {gc.top_p:g}"
    )
    rows = [
        ("path", info["path"] + (" (bundled)" if info["bundled"] else "")),
        ("model", f"{info['model_type']} ({', '.join(info['architectures']) or '?'})"),
        ("parameters", f"{n:,} ({n / 1e6:.2f} M)" if n else "?"),
        ("dtype", info["dtype"]),
        ("threads", str(info["threads"])),
        ("kernel tier", info["kernel_tier"] or "?"),
        (
            "prompt GEMM",
            info["prompt_gemm"]
            + (f" ({info['prompt_engine']})" if info["prompt_gemm"] == "bf16" else ""),
        ),
        # the layout applies to the quantized formats' down projection only
        *(
            [("down layout", info["down_layout"] or "?")]
            if info["dtype"] in QUANTIZED_DTYPES
            else []
        ),
        ("context", f"{info['context_length']} positions"),
        ("vocab", f"{info['vocab_size']} (tokenizer: {info['tokenizer_vocab_size']})"),
        ("stop ids", ", ".join(map(str, info["stop_token_ids"])) or "none"),
        ("chat template", "yes" if info["chat_template"] else "no"),
        (
            "generation",
            f"{sampling}, "
            + (
                f"max_length {gc.max_length}"
                if gc.max_length is not None
                else f"max_new_tokens {gc.max_new_tokens}"
            ),
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("config:")
    cfg = info["config"]
    key_width = max((len(k) for k in cfg), default=0)
    for k in cfg:
        print(f"  {k:<{key_width}}  {json.dumps(cfg[k])}")
    return 0


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


# Options that take a value: the next argument is always their value, even one that starts with
# '-' (``--stop --``, ``--system "-be brief-"``), as in the native CLI.
_VALUE_OPTIONS = frozenset(
    {
        "--model",
        "--dtype",
        "--threads",
        "--max-seq",
        "--max-new-tokens",
        "--temperature",
        "--top-k",
        "--top-p",
        "--min-p",
        "--repetition-penalty",
        "--seed",
        "--stop",
        "--system",
    }
)
# Text options whose value argparse may still mangle as ``--opt=VALUE`` (Python 3.11 drops a
# value of exactly "--"): passed as a placeholder and put back after parsing.
_TEXT_OPTIONS = {"--model": "model", "--stop": "stop", "--system": "system"}
_HELD = "\x00sparselm-arg-"


def _bind_option_values(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--opt VALUE`` as ``--opt=VALUE`` (argparse would take a VALUE starting with '-' for an
    option), text values starting with '-' held back as placeholders (returned second); ``--``
    and what follows are kept as they are."""
    out: list[str] = []
    held: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out.extend(argv[i:])
            break
        name = "--model" if a == "-m" else a
        if a.startswith("--") and "=" in a:
            # --opt=VALUE (argparse strips a VALUE of '--' to nothing, so text is held too)
            name, value = a.split("=", 1)
            step = 1
        elif name in _VALUE_OPTIONS and i + 1 < len(argv):
            value, step = argv[i + 1], 2
        else:
            out.append(a)
            i += 1
            continue
        if name in _TEXT_OPTIONS and value.startswith("-"):
            held.append(value)
            value = f"{_HELD}{len(held) - 1}"
        out.append(f"{name}={value}")
        i += step
    return out, held


def _restore_held(args: argparse.Namespace, held: list[str]) -> None:
    def back(v: Any) -> Any:
        if isinstance(v, str) and v.startswith(_HELD):
            return held[int(v[len(_HELD) :])]
        if isinstance(v, list):
            return [back(x) for x in v]
        return v

    for attr in _TEXT_OPTIONS.values():
        if hasattr(args, attr):
            setattr(args, attr, back(getattr(args, attr)))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sparselm`` command; returns the exit code."""
    parser = build_parser()
    bound, held = _bind_option_values(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(bound)
    _restore_held(args, held)
    reconfigure: Callable[..., Any] | None = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="replace")  # never die on a terminal that cannot show a char
        except (ValueError, OSError):
            pass
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except UsageError as exc:
        parser_for = getattr(args, "command", None)
        _error(f"{parser_for}: {exc}" if parser_for else str(exc))
        return 2
    except InvalidArgumentError as exc:
        _error(str(exc))
        return 2
    except UnicodeDecodeError as exc:
        _error(f"input is not valid UTF-8 ({exc.reason} at byte {exc.start})")
        return 2
    except SparselmError as exc:
        _error(str(exc))
        return 1
    except ImportError as exc:
        _error(str(exc))
        return 1
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, like other Unix tools.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
