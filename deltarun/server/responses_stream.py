"""Output items of a Responses answer, whole (`output_items`) or as the API's server-sent events
(`OutputStream`): reasoning items (the model's thinking as `reasoning_text`, a summary only when asked for),
one assistant message with its `output_text`, and one `function_call` item per tool call.

Every event carries the next `sequence_number` (`EventWriter`) and the id and output index of its item;
each item opens with `.added` and closes with `.done` (its content part and text too), the order the
official clients' stream helpers accumulate.
"""
from __future__ import annotations

import json
from typing import Any

from ..processor.tool_calls import ToolCall
from .common import new_id
from .streaming import ChatEvent, ChoiceTotal


def reasoning_item(iid: str, text: str, summary: bool, status: str) -> dict[str, Any]:
    return {"id": iid, "type": "reasoning", "status": status,
            "summary": [{"type": "summary_text", "text": text}] if summary else [],
            "content": [{"type": "reasoning_text", "text": text}]}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(iid: str, text: str, status: str) -> dict[str, Any]:
    return {"id": iid, "type": "message", "role": "assistant", "status": status, "content": [text_part(text)]}


def call_item(iid: str, call: ToolCall, status: str) -> dict[str, Any]:
    return {"id": iid, "type": "function_call", "status": status, "call_id": new_id("call_"), "name": call.name,
            "arguments": call.arguments_json}


def output_items(total: ChoiceTotal, summary: bool, status: str) -> list[dict[str, Any]]:
    """The output of a finished answer: reasoning, then the message (when there is text, or nothing else),
    then the calls."""
    items = [reasoning_item(new_id("rs_"), total.reasoning, summary, status)] if total.reasoning else []
    if total.content or not total.calls:
        items.append(message_item(new_id("msg_"), total.content, status))
    return items + [call_item(new_id("fc_"), c, status) for c in total.calls]


class EventWriter:
    """SSE lines of the Responses stream, numbered."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class OutputStream:
    """Chat events → Responses events; `items` is the output so far (the same shapes as `output_items`)."""

    def __init__(self, emit: EventWriter, summary: bool):
        self.emit, self.summary = emit, summary
        self.items: list[dict[str, Any]] = []
        self.open: str | None = None  # "reasoning" | "message": the item text is being added to

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1}

    def _add(self, item: dict[str, Any], part: dict[str, Any] | None) -> list[str]:
        self.items.append(item)
        out = [self.emit("response.output_item.added", output_index=len(self.items) - 1, item=item)]
        if part is not None:
            out.append(self.emit("response.content_part.added", **self._where(), content_index=0, part=part))
        return out

    def feed(self, ev: ChatEvent) -> list[str]:
        out: list[str] = []
        if ev.reasoning:
            if self.open != "reasoning":
                out += self.close("completed")
                self.open = "reasoning"
                part = {"type": "reasoning_text", "text": ""}
                out += self._add({"id": new_id("rs_"), "type": "reasoning", "status": "in_progress",
                                  "summary": [], "content": []}, part)
            self.items[-1]["content"] = [{"type": "reasoning_text", "text": self._text() + ev.reasoning}]
            out.append(self.emit("response.reasoning_text.delta", **self._where(), content_index=0,
                                 delta=ev.reasoning))
        if ev.content:
            if self.open != "message":
                out += self.close("completed")
                out += self._open_message()
            self.items[-1]["content"] = [text_part(self._text() + ev.content)]
            out.append(self.emit("response.output_text.delta", **self._where(), content_index=0, delta=ev.content,
                                 logprobs=[]))
        for call in ev.calls:
            out += self.close("completed")
            item = call_item(new_id("fc_"), call, "in_progress")
            out += self._add({**item, "arguments": ""}, None)
            out.append(self.emit("response.function_call_arguments.delta", **self._where(), delta=item["arguments"]))
            out.append(self.emit("response.function_call_arguments.done", **self._where(), name=call.name,
                                 arguments=item["arguments"]))
            self.items[-1] = {**item, "status": "completed"}
            out.append(self.emit("response.output_item.done", output_index=len(self.items) - 1, item=self.items[-1]))
        return out

    def _text(self) -> str:
        content = self.items[-1]["content"]
        return content[0]["text"] if content else ""

    def _open_message(self) -> list[str]:
        self.open = "message"
        return self._add({"id": new_id("msg_"), "type": "message", "role": "assistant", "status": "in_progress",
                          "content": []}, text_part(""))

    def close(self, status: str) -> list[str]:
        """Close the item text was going to (reasoning or message) with `status`."""
        if self.open is None:
            return []
        kind, self.open, text, where = self.open, None, self._text(), self._where()
        out = []
        if kind == "reasoning":
            item = reasoning_item(where["item_id"], text, self.summary, status)
            part = item["content"][0]
            out.append(self.emit("response.reasoning_text.done", **where, content_index=0, text=text))
            out.append(self.emit("response.content_part.done", **where, content_index=0, part=part))
            if self.summary:
                summary = item["summary"][0]
                out.append(self.emit("response.reasoning_summary_part.added", **where, summary_index=0,
                                     part={**summary, "text": ""}))
                out.append(self.emit("response.reasoning_summary_text.delta", **where, summary_index=0, delta=text))
                out.append(self.emit("response.reasoning_summary_text.done", **where, summary_index=0, text=text))
                out.append(self.emit("response.reasoning_summary_part.done", **where, summary_index=0, part=summary))
        else:
            item = message_item(where["item_id"], text, status)
            out.append(self.emit("response.output_text.done", **where, content_index=0, text=text, logprobs=[]))
            out.append(self.emit("response.content_part.done", **where, content_index=0, part=text_part(text)))
        self.items[-1] = item
        out.append(self.emit("response.output_item.done", output_index=where["output_index"], item=item))
        return out

    def finish(self, status: str) -> list[str]:
        """Close what is open; an answer with no text and no call still gets its (empty) message, as
        `output_items` gives it."""
        has_message = any(i["type"] == "message" for i in self.items)
        has_call = any(i["type"] == "function_call" for i in self.items)
        out = self.close(status)
        if not has_message and not has_call:
            out += self._open_message() + self.close(status)
        return out
