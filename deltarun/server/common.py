"""What the OpenAI and Ollama adapters share: building a chat prompt (messages as the template reads
them, thinking, tools, tool_choice, images and videos), sampling parameters with structured output, the
context-length check and ids for responses. Models are `EngineClient`s (deltarun/client.py).
"""
from __future__ import annotations

import asyncio
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from ..client import EngineClient
from ..inputs import MultiModalInput
from ..processor.multimodal import MediaRef, extract_media
from ..processor.reasoning import CLOSE, OPEN, ThinkingBudget, opens_think, skip_reasoning
from ..sampling import SamplingParams
from ..threads import release_pool
from .errors import APIError
from .structured import StructuredOutputError, make_structured
from .tool_grammar import forced_tool_processors


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the chat template reads them: tool-call arguments as dicts, text parts normalized.

    Image and video parts (`image`, `image_url`, `video`, `video_url`) pass through unchanged for
    `extract_media`, which also refuses any other part type."""
    import json

    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("role") == "developer":
            m["role"] = "system"
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type")
                if kind in ("text", "input_text") or (kind is None and "text" in part):
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                else:
                    parts.append(part)
            m["content"] = parts
        elif content is None:
            m["content"] = ""
        calls = []
        for tc in m.get("tool_calls") or []:
            fn = dict(tc.get("function", tc))
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    fn["arguments"] = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    raise ValueError(f"tool call arguments of {fn.get('name')!r} are not valid JSON") from None
            calls.append({"type": "function", "function": fn})
        if calls:
            m["tool_calls"] = calls
        out.append(m)
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


@dataclass
class ChatPrompt:
    ids: list[int]
    thinking: bool
    in_think: bool  # the prompt leaves a think block open (reasoning comes first)
    tools: list[dict] | None  # tools whose calls are parsed out of the answer (None: no parsing)
    prefix: str  # answer text forced into the prompt by tool_choice
    max_calls: int | None  # 1 when parallel_tool_calls is false
    mm: MultiModalInput | None = None  # the prompt's images/videos (`ids` are then the expanded ids)
    text: str = ""  # the rendered prompt (`ids` are its tokens unless it has media)


async def build_chat_prompt(llm: EngineClient, messages: list[dict[str, Any]], *, thinking: bool | None,
                            tools: list[dict] | None, tool_choice: Any = "auto", parallel: bool = True,
                            template_kwargs: dict[str, Any] | None = None,
                            context: list[int] | None = None,
                            reuse: tuple[str, list[int]] | None = None) -> ChatPrompt:
    """Render the conversation. `tool_choice`: "auto" | "none" | "required" | {"function": {"name"}}.
    `context`: token ids put before the rendered prompt (Ollama's /api/generate continuation).
    `reuse`: an earlier prompt's (text, ids); when this prompt starts with that text, its ids are those
    very ids and only the rest is tokenized, so the prefix cache serves them whatever the tokenizer would
    have merged across the boundary (a continued Responses conversation).

    "none" leaves the tools out of the prompt (the model cannot call what it is not shown). "required"
    and a named function write the opening of the call into the prompt, so the model must call (a named
    one: that function); the think block is closed first, so such turns skip reasoning. The OpenAI chat
    endpoint also constrains the rest of the call to the tool's schema (`tool_grammar.py`).
    """
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    kwargs = dict(template_kwargs or {})
    kwargs.pop("tools", None)
    if thinking is None and isinstance(kwargs.get("enable_thinking"), bool):
        thinking = kwargs["enable_thinking"]
    kwargs.pop("enable_thinking", None)
    forced = None
    if tools and tool_choice not in (None, "auto", "none", "required"):
        name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
        names = [t.get("function", t).get("name") for t in tools]
        if not isinstance(name, str) or name not in names:
            raise APIError(400, f"tool_choice names a function that is not in tools: {name!r}", param="tool_choice")
        forced = name
    elif tool_choice not in (None, "auto", "none", "required"):
        raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or a named function",
                       param="tool_choice")
    if tool_choice == "required" and not tools:
        raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
    shown = tools if tools and tool_choice != "none" else None
    plain, media = extract_media(template_messages(messages))
    prompt, _, on = llm.render(plain, thinking, shown, **kwargs)
    prefix = ""
    if shown and (tool_choice == "required" or forced):
        prompt = skip_reasoning(prompt)  # a forced call comes first: no reasoning before it
        prefix = "<tool_call>\n<function=" + (f"{forced}>\n" if forced else "")
        prompt += prefix
    if reuse and reuse[0] and not context and prompt.startswith(reuse[0]):
        ids = list(reuse[1]) + llm.tokenizer.encode(prompt[len(reuse[0]):])
    else:
        ids = list(context or []) + llm.tokenizer.encode(prompt)
    mm = None
    if media:
        media = [_client_media(llm, m) for m in media]
        try:  # decoding (a video: seconds) and loading the vision tower stay off the event loop
            ids, mm = await asyncio.to_thread(_prepare_media, llm, ids, media)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
    return ChatPrompt(ids, on, opens_think(prompt), shown, prefix, None if parallel else 1, mm, prompt)


_VISION_LOAD = threading.Lock()  # concurrent first image requests load the tower once


def _prepare_media(llm: EngineClient, ids: list[int], media: list[MediaRef]
                   ) -> tuple[list[int], MultiModalInput | None]:
    try:
        with _VISION_LOAD:
            llm.load_vision()
        return llm.prepare_media(ids, media)
    finally:
        release_pool()  # this worker thread's torch work is done: its OpenMP pool would slow the engine's


def _client_media(llm: EngineClient, ref: MediaRef) -> MediaRef:
    """A client's image/video as data, never a path on this machine: a data URL as it is, an http(s) URL
    only when the server allows them (`--allow-http-media`), anything else read as base64."""
    if not isinstance(ref.source, str):
        raise APIError(400, f"each {ref.kind} must be a data URL, base64 text or a URL", param="messages")
    source = ref.source.strip()
    if source.startswith("data:"):
        return ref
    if source.startswith(("http://", "https://")):
        cfg = llm.image_config if ref.kind == "image" else llm.video_config
        if not cfg.allow_http:
            raise APIError(400, f"{ref.kind} URLs (http/https) are off on this server (start it with "
                           "--allow-http-media); send the data as a data URL or base64", param="messages")
        return ref
    return MediaRef(ref.kind, "data:;base64," + source)


def add_structured(llm: EngineClient, params: SamplingParams, kind: str | None, schema: dict | None,
                   thinking: bool) -> SamplingParams:
    """Attach the JSON grammar mask for `kind` ("json_object" | "json_schema"); None/"text" = free text."""
    if kind in (None, "text"):
        return params
    try:
        params.logits_processors = make_structured(llm.tokenizer, kind, schema, thinking)
    except StructuredOutputError as e:
        raise APIError(400, str(e), param="response_format") from None
    return params


def add_forced_call(llm: EngineClient, params: SamplingParams, prompt: ChatPrompt) -> bool:
    """For a turn whose prompt forces a tool call (tool_choice required/named, Anthropic's any/tool), constrain
    the call itself to the tools' schemas (tool_grammar.py); True when it did (no other grammar then applies)."""
    if not (prompt.prefix and prompt.tools):
        return False
    try:
        params.logits_processors = forced_tool_processors(llm.tokenizer, prompt.tools, prompt.prefix)
    except StructuredOutputError as e:
        raise APIError(400, str(e), param="tools") from None
    return True


EFFORT_BUDGETS = {"low": 1024, "medium": 4096}  # tokens of reasoning; high and above: no limit


def effort_budget(effort: str | None) -> int | None:
    """The thinking budget a reasoning effort stands for (None: unlimited; none/minimal turn thinking off)."""
    return EFFORT_BUDGETS.get(effort or "")


def add_thinking_budget(llm: EngineClient, params: SamplingParams, budget: int | None,
                        prompt: "ChatPrompt") -> SamplingParams:
    """Bound the reasoning of a thinking turn to `budget` tokens (None: unbounded), then force `</think>`."""
    if budget is None or not prompt.thinking:
        return params
    open_id, close_id = llm.tokenizer.token_to_id(OPEN), llm.tokenizer.token_to_id(CLOSE)
    if open_id is None or close_id is None:  # a vocabulary without think tokens: nothing to bound
        return params
    bound = ThinkingBudget(budget, open_id, close_id, prompt.in_think)
    params.logits_processors = [*(params.logits_processors or []), bound]
    return params


def check_length(llm: EngineClient, n_prompt: int, max_tokens: int | None) -> None:
    """OpenAI's rule: prompt + max_tokens must fit the context (400 otherwise)."""
    ctx = llm.max_model_len
    if n_prompt >= ctx:
        raise APIError(400, f"the prompt has {n_prompt} tokens but the context length is {ctx}",
                       param="messages", code="context_length_exceeded")
    if max_tokens is not None and n_prompt + max_tokens > ctx:
        raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context "
                       f"length {ctx}", param="max_tokens", code="context_length_exceeded")


def sampling(**fields: Any) -> SamplingParams:
    """SamplingParams from request fields; a bad value is a 400 naming the field."""
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except (ValueError, TypeError) as e:
        msg = str(e)
        param = msg.split(" ")[0].removeprefix("SamplingParams.") if msg.startswith("SamplingParams.") else None
        raise APIError(400, msg.replace("SamplingParams.", ""), param=param) from None
