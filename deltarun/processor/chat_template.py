"""Chat messages -> prompt text, with the model's Jinja chat template.

``ChatTemplate.render`` gives byte-for-byte what transformers' ``apply_chat_template(..., tokenize=False)``
gives: the same sandboxed Jinja environment (trim_blocks, lstrip_blocks, loop controls, a ``generation`` tag
that renders its body), the same globals (``raise_exception``, ``strftime_now``, ``dict``, a ``namespace``
that refuses underscore names), a ``tojson`` filter that does not HTML-escape, the same input clean-up
(keys whose value is None dropped, reasoning field aliases) and the tokenizer's special tokens as variables.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_SPECIAL_TOKENS: dict[str, str] = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class _SafeNamespace(jinja2.utils.Namespace):
    """Jinja ``namespace`` that refuses attribute names starting with an underscore."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _DictMaker:
    """The ``dict`` global: builds plain dicts, exposes nothing else."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictMaker()
    env.globals["namespace"] = _SafeNamespace
    return env


def _plain(value: Any) -> Any:
    """Rebuild input out of plain JSON-like types; anything else becomes a ``<TypeName>`` placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy / torch scalars
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Sequence[Any]) -> list[dict]:
    out: list[dict] = []
    for message in messages:
        if callable(getattr(message, "model_dump", None)):
            message = message.model_dump()
        elif dataclasses.is_dataclass(message) and not isinstance(message, type):
            message = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        msg = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((msg[k] for k in _REASONING_KEYS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


class ChatTemplate:
    """A compiled chat template plus the special-token variables the tokenizer would pass to it."""

    def __init__(self, source: str, special_tokens: Mapping[str, str | None] | None = None) -> None:
        self.source = source
        self.special_tokens: dict[str, str] = {
            k: v for k, v in (DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens).items()
            if v is not None
        }
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template syntax error (line {e.lineno}): {e.message}") from None
        self._thinking_default: bool | None = None

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> ChatTemplate | None:
        """chat_template.jinja, else ``chat_template`` in tokenizer_config.json; None when there is neither."""
        folder = Path(path)
        config: dict = {}
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"corrupt tokenizer config {config_file}: {e}") from None
        special = {k: _token_text(config[k]) for k in _SPECIAL_KEYS if k in config} if config else None
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(encoding="utf-8"), special)
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {item.get("name"): item.get("template") for item in source if isinstance(item, Mapping)}
            source = named.get("default")
        if isinstance(source, str):
            return cls(source, special)
        return None

    @classmethod
    def builtin(cls, thinking_default: bool) -> ChatTemplate:
        """The bundled template: official 4B/9B one (thinking on) or the 0.8B/2B variant (thinking off)."""
        name = "chat_template.jinja" if thinking_default else "chat_template.0.8B-2B.jinja"
        return cls((DATA_DIR / name).read_text(encoding="utf-8"))

    def render(
        self,
        messages: Sequence[Any],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Prompt text for ``messages``. ``enable_thinking=None`` leaves the variable undefined.

        Errors raised by the template (no user message, misplaced system message, unknown role...) become
        ``ValueError`` with the template's message.
        """
        if not messages:
            raise ValueError("cannot render an empty conversation")
        if tools is not None:
            for tool in tools:
                if not isinstance(tool, Mapping):
                    raise ValueError(f"tools must be JSON-schema dicts, got {type(tool).__name__}")
        variables: dict[str, Any] = dict(self.special_tokens)
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        variables.update(_plain(kwargs))
        documents = _plain(variables.pop("documents", None))
        try:
            return self._template.render(
                messages=_prepare_messages(messages),
                tools=_plain(list(tools)) if tools is not None else None,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise ValueError(str(e.message if e.message is not None else e)) from None

    @property
    def thinking_default(self) -> bool:
        """Whether the generation prompt leaves a think block open when enable_thinking is not given."""
        if self._thinking_default is None:
            prompt = self.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
            self._thinking_default = prompt.rstrip("\n").endswith("<think>")
        return self._thinking_default


def _token_text(value: Any) -> str | None:
    if isinstance(value, Mapping):  # {"content": "<|im_end|>", ...} in older configs
        return value.get("content")
    return value if isinstance(value, str) else None
