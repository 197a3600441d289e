"""Chat-format JSONL → token ids with an assistant-only loss mask → packed rows (train/forward.py `Row`).

A line is one conversation: {"messages": [...], "tools": [...]?, "enable_thinking": bool?} with messages as the
OpenAI chat API takes them (system / user / assistant with content, reasoning_content and tool_calls / tool).
The whole conversation is rendered once by the model's chat template (processor/chat_template.py), exactly
as inference renders it; the loss covers what the model itself writes in each assistant turn:

- a turn starts where the template's generation prompt (`add_generation_prompt`) after the earlier messages
  stops matching the rendering — so "<|im_start|>assistant\\n" (and an empty think block where the template
  puts one in the prompt) is input, while reasoning the data carries is learned;
- it ends with the template's end-of-turn token (`eos_token`, "<|im_end|>"): the newline after it is glue.

Each turn's place is found by rendering prefixes of the conversation. The Qwen3.5 template renders an
assistant turn differently depending on whether a user question follows it (reasoning is dropped from earlier
rounds), so when a later user message exists a stand-in user message is appended to the prefix, which puts the
prefix in the same situation; every prefix is checked to be a prefix of the full rendering, and a conversation
where none is gets an error naming its line. Pieces are tokenized separately at the turn boundaries, as
inference tokenizes a prompt and then appends generated tokens.

Packing: examples in a (seeded, per-epoch) shuffled order fill rows of at most `batch_tokens` tokens; an example
longer than that is cut to it. No state crosses examples inside a row (train/forward.py).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..processor.chat_template import ChatTemplate
from ..processor.tokenizer import Tokenizer
from .forward import Row

STAND_IN = {"role": "user", "content": "\u2063"}  # an invisible separator: a user message no data contains


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and line."""


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # loss on token j (it is one the model writes)
    line: int  # 1-based line in the JSONL file

    @property
    def loss_tokens(self) -> int:
        return sum(self.mask)


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line; DataError for a missing file or a malformed line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training data {path} does not exist")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not rec["messages"]:
                raise DataError(f"{path}:{n}: expected an object with a non-empty \"messages\" list")
            out.append((n, rec))
    if not out:
        raise DataError(f"{path} holds no conversations")
    return out


def _token_lcp(prompt: str, text: str, tokenizer: Tokenizer) -> int:
    """Characters of the longest run of whole tokens of `prompt` that `text` starts with (whole tokens: a
    generation prompt "<think>" and a rendered "<tool_call>" share "<t", not a token)."""
    ids = tokenizer.encode(prompt)
    n = 0
    for j in range(1, len(ids) + 1):
        piece = tokenizer.decode(ids[:j])
        if not text.startswith(piece):
            break
        n = len(piece)
    return n


class Renderer:
    """Renders conversations with a template and finds their assistant spans (character offsets)."""

    def __init__(self, template: ChatTemplate, tokenizer: Tokenizer):
        self.template, self.tokenizer = template, tokenizer
        self.eos = template.special_tokens.get("eos_token", "<|im_end|>")
        one = template.render([STAND_IN], add_generation_prompt=False)
        two = template.render([STAND_IN, STAND_IN], add_generation_prompt=False)
        if not two.startswith(one):
            raise DataError("the chat template renders a user message differently after another: cannot split turns")
        self.stand_in = two[len(one):]

    def _render(self, messages: list, kw: dict, gen: bool, stand_in: bool) -> tuple[str, str] | None:
        """(rendering of `messages` without the stand-in, generation prompt after it), None if the template
        refuses the prefix (a conversation that opens with an assistant turn)."""
        msgs = messages + [STAND_IN] if stand_in else messages
        if not msgs:
            return None
        try:
            text = self.template.render(msgs, add_generation_prompt=False, **kw)
            prompt = self.template.render(msgs, add_generation_prompt=True, **kw)[len(text):] if gen else ""
        except ValueError:
            return None
        if stand_in:
            if not text.endswith(self.stand_in):
                return None
            text = text[: len(text) - len(self.stand_in)]
        return text, prompt

    def _prefix(self, full: str, messages: list, kw: dict, gen: bool, later_user: bool) -> tuple[str, str] | None:
        for stand_in in ((True, False) if later_user else (False, True)):
            r = self._render(messages, kw, gen, stand_in)
            if r is not None and full.startswith(r[0]):
                return r
        return None

    def spans(self, messages: list, tools: list | None, kw: dict) -> tuple[str, list[tuple[int, int]]]:
        """The full rendering and the [start, end) character span the loss covers in each assistant turn."""
        kw = dict(kw, tools=tools)
        full = self.template.render(messages, add_generation_prompt=False, **kw)
        spans = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") != "assistant":
                continue
            later_user = any(isinstance(x, dict) and x.get("role") == "user" for x in messages[i + 1:])
            before = self._prefix(full, messages[:i], kw, True, later_user)
            through = self._prefix(full, messages[:i + 1], kw, False, later_user)
            if before is None or through is None:
                raise DataError(f"the chat template renders assistant message {i + 1} differently depending on what "
                                "follows it: its span cannot be found")
            start = len(before[0]) + _token_lcp(before[1], full[len(before[0]):], self.tokenizer)
            end = len(through[0])
            cut = full.rfind(self.eos, start, end)
            if cut >= 0:
                end = cut + len(self.eos)
            if end > start:
                spans.append((start, end))
        return full, spans


def _check_media(messages: list) -> None:
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and ({"image", "image_url", "video", "video_url"} & (
                        set(part) | {str(part.get("type"))})):
                    raise ValueError("images and videos are not supported in training data")


def encode(record: dict, renderer: Renderer, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """One conversation → (token ids, loss mask). ValueError (without the line) for what cannot be used."""
    messages = record["messages"]
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ValueError("\"tools\" must be a list")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise ValueError("no assistant message to learn from")
    _check_media(messages)
    kw: dict[str, Any] = dict(record.get("chat_template_kwargs") or {})
    if "enable_thinking" in record:
        kw["enable_thinking"] = bool(record["enable_thinking"])
    full, spans = renderer.spans(messages, tools, kw)
    ids: list[int] = []
    mask: list[bool] = []
    at = 0
    for start, end in spans + [(len(full), len(full))]:
        for text, learn in ((full[at:start], False), (full[start:end], True)):
            piece = tokenizer.encode(text)
            ids += piece
            mask += [learn] * len(piece)
        at = end
    if not any(mask):
        raise ValueError("no assistant tokens to learn from")
    return ids, mask


def load_examples(path: str | Path, template: ChatTemplate, tokenizer: Tokenizer, vocab_size: int) -> list[Example]:
    """Every conversation of a JSONL file encoded; DataError naming the line for the first bad one."""
    renderer = Renderer(template, tokenizer)
    out = []
    for n, rec in read_jsonl(path):
        try:
            ids, mask = encode(rec, renderer, tokenizer)
        except (ValueError, TypeError) as e:
            raise DataError(f"{path}:{n}: {e}") from None
        if max(ids) >= vocab_size:
            raise DataError(f"{path}:{n}: token id {max(ids)} is outside the model's vocabulary ({vocab_size}): "
                            "the tokenizer does not belong to this model")
        out.append(Example(ids, mask, n))
    return out


def labels_of(ex: Example, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n], labels [n]) of an example cut to `limit` tokens: labels[t] = ids[t+1] where that token is
    learned, else -100 (the last position predicts nothing)."""
    ids = torch.tensor(ex.ids[:limit])
    mask = torch.tensor(ex.mask[:limit])
    labels = torch.full_like(ids, -100)
    labels[:-1] = torch.where(mask[1:], ids[1:], torch.tensor(-100))
    return ids, labels


def pack(examples: list[Example], batch_tokens: int) -> list[Row]:
    """Consecutive examples into rows of ≤ batch_tokens tokens (an example longer than that is cut)."""
    rows: list[Row] = []
    cur: list[tuple[torch.Tensor, torch.Tensor]] = []
    size = 0
    for ex in examples:
        ids, labels = labels_of(ex, batch_tokens)
        if cur and size + len(ids) > batch_tokens:
            rows.append(_row(cur))
            cur, size = [], 0
        cur.append((ids, labels))
        size += len(ids)
    if cur:
        rows.append(_row(cur))
    return [r for r in rows if r.loss_tokens]


def _row(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> Row:
    return Row(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), [len(p[0]) for p in parts])


def epoch_rows(examples: list[Example], batch_tokens: int, seed: int, epoch: int) -> list[Row]:
    """The packed rows of epoch `epoch`: examples shuffled by (seed, epoch), so a resumed run sees the same."""
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return pack([examples[i] for i in order], batch_tokens)
