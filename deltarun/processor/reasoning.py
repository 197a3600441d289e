"""Split generated text into reasoning (inside ``<think>``...``</think>``) and the answer, streaming or not.

With thinking on, the prompt ends with ``<think>\\n`` and the model writes ``{reasoning}\\n</think>\\n\\n{answer}``.
The split follows the chat template's own reading of that format: newlines at both ends of the reasoning are
dropped, and so are the newlines that open the answer. A ``<think>`` the model writes itself at the very
start (after optional whitespace) opens a think block even when the prompt did not. Without a ``</think>``
everything after the opening is reasoning (a generation cut short while thinking).

This module is the only place that knows the format: the front ends (llm.py, async_llm.py), the server
(a chat choice's parsing, tool_choice prompts) and the CLI (through `StreamDelta.reasoning`) call it.
"""

from __future__ import annotations

from ..outputs import StreamDelta

OPEN = "<think>"
CLOSE = "</think>"
_OPEN_PROMPT = OPEN + "\n"  # how the chat template ends a generation prompt that thinks

_START, _THINK, _ANSWER = "start", "think", "answer"


def split_reasoning(text: str, in_think: bool) -> tuple[str, str]:
    """(reasoning, content) of a complete generation; ``in_think``: the prompt ended inside a think block."""
    body = text
    stripped = text.lstrip()
    if stripped.startswith(OPEN):
        body, in_think = stripped[len(OPEN) :], True
    if not in_think:
        return "", text
    end = body.find(CLOSE)
    if end == -1:
        return body.strip("\n"), ""
    return body[:end].strip("\n"), body[end + len(CLOSE) :].lstrip("\n")


def opens_think(prompt: str) -> bool:
    """Whether a rendered prompt leaves a think block open, so the generation starts with reasoning."""
    return prompt.endswith(_OPEN_PROMPT)


def skip_reasoning(prompt: str) -> str:
    """The prompt with an open think block closed empty (what the template writes for no reasoning),
    so the generation starts with the answer."""
    return prompt + "\n" + CLOSE + "\n\n" if opens_think(prompt) else prompt


def _partial_suffix(buf: str, tag: str) -> int:
    """Length of the longest suffix of buf that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(buf)), 0, -1):
        if buf.endswith(tag[:k]):
            return k
    return 0


class ReasoningParser:
    """Streaming ``split_reasoning``: ``feed`` pieces, then ``finish``; the deltas add up to the same split."""

    def __init__(self, in_think: bool) -> None:
        self.in_think = in_think
        self._state = _START
        self._buf = ""
        self._trim_start = True  # drop newlines that open the current section
        self.saw_close = False

    @property
    def in_reasoning(self) -> bool:
        """Whether text fed now would count as reasoning (before the first text: what the prompt implies)."""
        return self._state == _THINK or (self._state == _START and self.in_think)

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning_delta, content_delta) for the next piece of generated text; `final`: it is the
        last piece (what `finish` holds back comes out too)."""
        self._buf += text
        r, c = self._advance(final=False)
        if final:
            r2, c2 = self.finish()
            r, c = r + r2, c + c2
        return r, c

    def finish(self) -> tuple[str, str]:
        """Deltas for text held back at the end of the generation."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            if self._state == _START:
                head = self._buf.lstrip()
                if head.startswith(OPEN):
                    self._buf = head[len(OPEN) :]
                    self._state, self._trim_start = _THINK, True
                    continue
                if not final and OPEN.startswith(head):  # still could become "<think>"
                    break
                self._state = _THINK if self.in_think else _ANSWER
                self._trim_start = self.in_think
                continue
            if self._state == _THINK:
                if self._trim_start:
                    self._buf = self._buf.lstrip("\n")
                    if not self._buf:
                        break
                    self._trim_start = False
                end = self._buf.find(CLOSE)
                if end != -1:
                    reasoning.append(self._buf[:end].rstrip("\n"))
                    self._buf = self._buf[end + len(CLOSE) :]
                    self._state, self._trim_start, self.saw_close = _ANSWER, True, True
                    continue
                if final:
                    reasoning.append(self._buf.rstrip("\n"))
                    self._buf = ""
                    break
                keep = _partial_suffix(self._buf, CLOSE)
                head = self._buf[: len(self._buf) - keep]
                safe = head.rstrip("\n")  # trailing newlines may be the ones before "</think>"
                reasoning.append(safe)
                self._buf = self._buf[len(safe) :]
                break
            # answer
            if self._trim_start:
                self._buf = self._buf.lstrip("\n")
                if not self._buf:
                    break
                self._trim_start = False
            content.append(self._buf)
            self._buf = ""
            break
        return "".join(reasoning), "".join(content)


class DeltaSplitter:
    """Fills `reasoning` / `content` of a chat stream's `StreamDelta`s, in order, one parser per sequence."""

    def __init__(self, prompt: str) -> None:
        self.in_think = opens_think(prompt)
        self._parsers: dict[int, ReasoningParser] = {}

    def __call__(self, delta: StreamDelta) -> StreamDelta:
        parser = self._parsers.setdefault(delta.index, ReasoningParser(in_think=self.in_think))
        delta.reasoning, delta.content = parser.feed(delta.text, final=delta.finish_reason is not None)
        return delta


class ThinkingBudget:
    """A `SamplingParams.logits_processors` factory bounding the reasoning: once `budget` tokens have been
    written inside the think block, the next token is forced to be ``</think>`` and the answer follows
    (`thinking_budget` on chat completions; Responses' reasoning.effort; Anthropic's budget_tokens).
    `open_id`/`close_id`: the ids of ``<think>``/``</think>``; `in_think`: the prompt leaves a block open."""

    def __init__(self, budget: int, open_id: int, close_id: int, in_think: bool):
        if budget < 0:
            raise ValueError(f"the thinking budget must be ≥ 0 tokens, not {budget}")
        self.budget, self.open_id, self.close_id, self.in_think = budget, open_id, close_id, in_think

    def __call__(self) -> "_BudgetMask":
        return _BudgetMask(self)


class _BudgetMask:
    """One sequence's count of reasoning tokens; `accept` follows the tokens it really emitted."""

    def __init__(self, spec: ThinkingBudget):
        self.spec = spec
        self.inside = spec.in_think
        self.used = 0
        self.started = False

    def __call__(self, logits) -> None:  # logits: [V], masked in place
        if self.inside and self.used >= self.spec.budget:
            logits.fill_(float("-inf"))
            logits[self.spec.close_id] = 0.0

    def accept(self, token_id: int) -> None:
        if not self.started and not self.inside and token_id == self.spec.open_id:
            self.inside = True  # the model opened a block itself, as its first token
        elif self.inside:
            if token_id == self.spec.close_id:
                self.inside = False
            else:
                self.used += 1
        self.started = True
