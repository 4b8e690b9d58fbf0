"""The tokenizer and chat template of a checkpoint.

Owns reading ``tokenizer.json`` (through the ``tokenizers`` package), ``tokenizer_config.json``
(special tokens, ``added_tokens_decoder``, ``chat_template``) and an optional
``chat_template.jinja``, and rendering the checkpoint's own chat template the way transformers
does (sandboxed Jinja, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``,
``strftime_now``, special-token variables).

It must not import the native extension or any deep-learning framework, and it never hard-codes
a template: the one the checkpoint ships is the one rendered.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers

from ._errors import FormatError, InvalidArgumentError, ModelIOError, SparselmError
from .generation import as_id_list, eos_ids_from_hf_dict, is_int

if TYPE_CHECKING:
    import jinja2

__all__ = ["Message", "Tokenizer", "validate_messages"]

#: One chat message: a mapping with at least "role" and "content" strings.
Message = Mapping[str, Any]

#: The special tokens that end a turn in ChatML checkpoints (Qwen2 / PLM); see plm-architecture §4.
_DEFAULT_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def read_text_file(path: Path) -> str:
    """A UTF-8 text file: ModelIOError if it cannot be read, FormatError if it is not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelIOError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not UTF-8 text: {exc}") from exc


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; every way it can be malformed is a FormatError."""
    text = read_text_file(path)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError, integers past Python's digit limit, nesting past the recursion limit
        raise FormatError(f"{path}: invalid JSON: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


# Token ids of `tokenizers` are 32-bit.
_ID_LIMIT = 2**32


def check_unicode(text: str, what: str) -> None:
    """Raise InvalidArgumentError if ``text`` holds a lone surrogate (no UTF-8 form exists, so
    no tokenizer can read it; Python makes such strings of undecodable bytes, e.g. in
    ``sys.argv``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(
            f"{what} is not valid Unicode: lone surrogate {text[exc.start]!r} at index "
            f"{exc.start} (from bytes that are not UTF-8?)"
        ) from None


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a chat: a non-empty list of mappings with string ``role`` and ``content``.

    Returns shallow copies of the messages as plain dicts. Raises InvalidArgumentError naming the
    offending message otherwise. Extra keys are kept (templates may use them).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise InvalidArgumentError(
            "messages must be a list of {'role': ..., 'content': ...} dicts, got "
            f"{type(messages).__name__}"
        )
    if not messages:
        raise InvalidArgumentError("messages must not be empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidArgumentError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}"
            )
        for key in ("role", "content"):
            if key not in m:
                raise InvalidArgumentError(f"messages[{i}] has no {key!r} key")
            if not isinstance(m[key], str):
                raise InvalidArgumentError(
                    f"messages[{i}][{key!r}] must be a string, got {type(m[key]).__name__}"
                )
            check_unicode(m[key], f"messages[{i}][{key!r}]")
        if not m["role"]:
            raise InvalidArgumentError(f"messages[{i}]['role'] must not be empty")
        out.append(dict(m))
    return out


def _raise_exception(message: str) -> None:
    # Templates call raise_exception(...) to reject a conversation (e.g. roles not alternating).
    raise InvalidArgumentError(f"the chat template rejected the messages: {message}")


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers overrides Jinja's tojson: no HTML escaping, non-ASCII kept.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(jinja2.ext.Extension):
        """transformers' ``{% generation %}`` ... ``{% endgeneration %}``: it marks the
        assistant's text for token masks; rendered, it is its body."""

        tags = {"generation"}  # noqa: RUF012 (jinja2.ext.Extension declares it so)

        def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, GenerationBlocks],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise FormatError(f"the chat template is not valid Jinja: {exc}") from exc


class Tokenizer:
    """A checkpoint's tokenizer: ids <-> text, special tokens and the chat template.

    Build one with :meth:`from_dir` (what :func:`sparselm.load` does) or wrap an existing
    ``tokenizers.Tokenizer``. Special tokens written in text (``<|im_start|>``...) are parsed as
    single special ids by :meth:`encode`. No BOS token is ever added unless
    ``add_special_tokens=True`` and the tokenizer's post-processor adds one.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        name_or_path: str | None = None,
    ) -> None:
        """Wrap ``tokenizer``.

        Args:
            tokenizer: The ``tokenizers.Tokenizer`` (from a ``tokenizer.json``).
            chat_template: Jinja source of the chat template, or None.
            special_tokens: ``bos_token``/``eos_token``/``pad_token``/``unk_token`` strings.
            extra_eos_token_ids: More ids that end generation (e.g. ``eos_token_id`` of
                ``config.json`` and ``generation_config.json``).
            name_or_path: Where it came from, for ``repr`` and error messages.
        """
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise InvalidArgumentError(
                f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
            )
        self._tok = tokenizer
        self._chat_template = chat_template
        self._compiled: jinja2.Template | None = None
        self._max_id: int | None = None
        self._special: dict[str, str | None] = dict.fromkeys(_SPECIAL_TOKEN_KEYS)
        for k, v in (special_tokens or {}).items():
            if k not in self._special:
                raise InvalidArgumentError(f"unknown special token kind {k!r}")
            self._special[k] = v
        self._name = name_or_path
        eos: list[int] = []
        for t in (*_DEFAULT_EOS_TOKENS, self._special["eos_token"]):
            i = tokenizer.token_to_id(t) if t else None
            if i is not None and i not in eos:
                eos.append(i)
        for i in extra_eos_token_ids:
            if int(i) not in eos:
                eos.append(int(i))
        self._eos_ids = tuple(eos)

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load ``tokenizer.json`` plus, when present, ``tokenizer_config.json``,
        ``chat_template.jinja`` (preferred over the config's ``chat_template``, as in
        transformers), and the ``eos_token_id`` of ``config.json`` / ``generation_config.json``.

        Raises ModelIOError when ``tokenizer.json`` is missing or unreadable and FormatError when
        a file is malformed.
        """
        d = Path(path)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise ModelIOError(f"no tokenizer.json in {d}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tj))
            tok.encode("Hello, world! 123")  # a component that cannot run fails here, not later
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            # tokenizers raises a bare Exception on parse errors, and a PanicException (a
            # BaseException) where its Rust code panics on a component it accepted
            raise FormatError(
                f"{tj}: cannot load the tokenizer: {type(exc).__name__}: {exc}"
            ) from exc

        cfg: dict[str, Any] = {}
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = read_json_object(cfg_path)
        _apply_added_tokens_decoder(tok, cfg, cfg_path)

        template: str | None = None
        jinja_path = d / "chat_template.jinja"
        if jinja_path.is_file():
            template = read_text_file(jinja_path)
        else:
            template = _pick_template(cfg.get("chat_template"), cfg_path)

        extra_eos: list[int] = []
        # config.json belongs to the engine, which validates it and reports its errors (as
        # ConfigError); here it is only a best-effort source of eos ids.
        try:
            model_cfg = read_json_object(d / "config.json")
        except (SparselmError, OSError):
            model_cfg = {}
        try:
            extra_eos.extend(eos_ids_from_hf_dict(model_cfg))
        except InvalidArgumentError as exc:
            raise FormatError(f"{d / 'config.json'}: {exc}") from exc
        gen_path = d / "generation_config.json"
        if gen_path.is_file():
            try:
                extra_eos.extend(eos_ids_from_hf_dict(read_json_object(gen_path)))
            except InvalidArgumentError as exc:
                raise FormatError(f"{gen_path}: {exc}") from exc

        special = {k: _token_content(cfg.get(k)) for k in _SPECIAL_TOKEN_KEYS}
        return cls(
            tok,
            chat_template=template,
            special_tokens=special,
            extra_eos_token_ids=extra_eos,
            name_or_path=str(d),
        )

    # -- properties ---------------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added/special tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def max_token_id(self) -> int:
        """The largest id of any token (-1 for an empty vocabulary); ids need not be dense."""
        if self._max_id is None:
            ids = self._tok.get_vocab(with_added_tokens=True).values()
            self._max_id = max(ids, default=-1)
        return self._max_id

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def chat_template(self) -> str | None:
        """The Jinja source of the chat template, or None when the checkpoint has none."""
        return self._chat_template

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: ``<|im_end|>`` and ``<|endoftext|>`` when present, the
        ``eos_token`` of tokenizer_config.json, and ``eos_token_id`` of config.json and
        generation_config.json."""
        return self._eos_ids

    @property
    def bos_token(self) -> str | None:
        """The BOS token string (None for Qwen2/PLM)."""
        return self._special["bos_token"]

    @property
    def eos_token(self) -> str | None:
        """The EOS token string from tokenizer_config.json, if any."""
        return self._special["eos_token"]

    @property
    def pad_token(self) -> str | None:
        """The padding token string from tokenizer_config.json, if any."""
        return self._special["pad_token"]

    @property
    def special_tokens(self) -> dict[str, str | None]:
        """The bos/eos/pad/unk token strings (None where unset)."""
        return dict(self._special)

    # -- ids <-> text -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text are single special ids.

        ``add_special_tokens=True`` runs the tokenizer's post-processor (BOS/EOS templates);
        Qwen2/PLM tokenizers add nothing either way.
        """
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text must be a str, got {type(text).__name__}")
        check_unicode(text, "text")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; with ``skip_special_tokens`` special tokens are left out."""
        # (ids below _ID_LIMIT but past the vocabulary decode to nothing, as in `tokenizers`)
        ids_list = as_id_list(ids, "ids", vocab_size=_ID_LIMIT)
        return str(self._tok.decode(ids_list, skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (e.g. ``"<|im_end|>"``), or None if it is not in the vocab."""
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of an id, or None if the id is not in the vocab."""
        if not is_int(token_id):
            raise InvalidArgumentError(
                f"token_id must be an int, got {type(token_id).__name__} {token_id!r}"
            )
        if not 0 <= token_id < _ID_LIMIT:
            return None
        t = self._tok.id_to_token(int(token_id))
        return None if t is None else str(t)

    # -- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        *,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render a conversation with the checkpoint's own chat template.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
            add_generation_prompt: Append the opening of an assistant turn
                (``<|im_start|>assistant\\n`` for ChatML), so the model answers next.
            chat_template: Render this Jinja source instead of the checkpoint's template.
            **template_kwargs: Extra variables for the template (e.g. ``tools``).

        The template sees ``messages``, ``add_generation_prompt``, the special tokens that are set
        (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``), ``raise_exception``,
        ``strftime_now`` and a ``tojson`` filter, like in transformers.

        Raises:
            InvalidArgumentError: malformed messages, no chat template, or the template called
                ``raise_exception``.
            FormatError: the template is not valid Jinja.
        """
        msgs = validate_messages(messages)
        if chat_template is not None:
            template = _compile_template(chat_template)
        else:
            if self._chat_template is None:
                raise InvalidArgumentError(
                    f"the tokenizer{' of ' + self._name if self._name else ''} has no chat "
                    "template (no chat_template in tokenizer_config.json and no "
                    "chat_template.jinja); pass chat_template=..."
                )
            if self._compiled is None:
                self._compiled = _compile_template(self._chat_template)
            template = self._compiled
        variables: dict[str, Any] = {k: v for k, v in self._special.items() if v is not None}
        # transformers always defines these (None unless given)
        variables.update(tools=None, documents=None)
        variables.update(template_kwargs)
        variables["messages"] = msgs
        variables["add_generation_prompt"] = bool(add_generation_prompt)
        import jinja2

        try:
            return str(template.render(**variables))
        except SparselmError:
            raise  # raise_exception() in the template
        except (
            jinja2.TemplateError,
            ArithmeticError,
            LookupError,
            TypeError,
            ValueError,
            RecursionError,
        ) as exc:
            # also Python errors of the template's own expressions (a filter given the wrong
            # type, a missing key, a macro calling itself without end, ...)
            raise InvalidArgumentError(
                f"rendering the chat template failed: {type(exc).__name__}: {exc}"
            ) from exc

    def __getstate__(self) -> dict[str, Any]:
        # the compiled chat template is a cache (its class is local to the compiling function,
        # so it cannot be pickled): copies and pickles leave it out and compile again on use
        state = dict(self.__dict__)
        state["_compiled"] = None
        return state

    def __repr__(self) -> str:
        where = f"{self._name!r}, " if self._name else ""
        return (
            f"Tokenizer({where}vocab_size={self.vocab_size}, eos_token_ids={list(self._eos_ids)}, "
            f"chat_template={'yes' if self._chat_template else 'no'})"
        )


def _pick_template(value: Any, cfg_path: Path) -> str | None:
    """``chat_template`` is a string, or a list of {"name", "template"} (use "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {
            t.get("name"): t.get("template")
            for t in value
            if isinstance(t, dict) and isinstance(t.get("template"), str)
        }
        if "default" in named:
            return str(named["default"])
        if len(named) == 1:
            return str(next(iter(named.values())))
        if not named:
            raise FormatError(
                f'{cfg_path}: chat_template is a list without any {{"name", "template"}} entry'
            )
        raise FormatError(f"{cfg_path}: chat_template lists several templates but no 'default'")
    raise FormatError(f"{cfg_path}: chat_template must be a string, got {type(value).__name__}")


def _apply_added_tokens_decoder(
    tok: tokenizers.Tokenizer, cfg: Mapping[str, Any], path: Path
) -> None:
    """Make sure every token of ``added_tokens_decoder`` exists with its declared id."""
    decoder = cfg.get("added_tokens_decoder")
    if decoder is None or decoder == []:
        decoder = {}  # an empty list is an empty table; other non-objects are errors
    if not isinstance(decoder, dict):
        raise FormatError(f"{path}: added_tokens_decoder must be an object")

    def is_id(key: str) -> bool:
        return key.isascii() and key.isdecimal() and len(key) <= 10

    for key, spec in sorted(decoder.items(), key=lambda kv: int(kv[0]) if is_id(kv[0]) else -1):
        content = _token_content(spec)
        if not is_id(key) or content is None:
            raise FormatError(f"{path}: bad added_tokens_decoder entry {key!r}: {spec!r}")
        want = int(key)
        have = tok.token_to_id(content)
        if have is None:
            special = bool(spec.get("special", True)) if isinstance(spec, dict) else True
            added = tokenizers.AddedToken(content, special=special, normalized=not special)
            if special:
                tok.add_special_tokens([added])
            else:
                tok.add_tokens([added])
            have = tok.token_to_id(content)
        if have != want:
            raise FormatError(
                f"{path}: added_tokens_decoder gives {content!r} id {want}, but tokenizer.json "
                f"has it as id {have}"
            )
