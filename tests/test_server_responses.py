"""OpenAI Responses API end to end: the official `openai` client and the OpenAI Agents SDK against a live
server with a tiny random checkpoint. Random weights write noise, so reasoning and free tool calls run on
scripted output; forced calls and JSON output come from the real engine under its grammars."""
import asyncio
import base64
import io
import json
import uuid
from typing import Literal

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from server_helpers import live_server, scripted

TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}
CALL = ["<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"]


@pytest.fixture(scope="module")
def live(chat_ckpt):
    return live_server(chat_ckpt)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def test_text_usage_store_and_items(client, live):
    from deltarun.server.metrics import METRICS

    served = METRICS.requests["ok"]
    r = client.responses.create(model="tiny", input="Hello there", max_output_tokens=5, temperature=0,
                                metadata={"k": "v"})
    assert r.object == "response" and r.model == "tiny" and r.metadata == {"k": "v"} and r.id.startswith("resp_")
    assert r.usage.input_tokens == len(live.llm.render([{"role": "user", "content": "Hello there"}], None)[1])
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert METRICS.requests["ok"] == served + 1  # /metrics counts it like the other routes
    assert r.usage.output_tokens_details.reasoning_tokens == 0 and r.usage.output_tokens <= 5
    if r.status == "incomplete":  # noise rarely ends within 5 tokens
        assert r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 5
    assert [i.type for i in r.output] == ["message"] and r.output_text == r.output[0].content[0].text
    assert client.responses.retrieve(r.id).output_text == r.output_text
    items = client.responses.input_items.list(r.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "Hello there")]
    counted = client.responses.input_tokens.count(model="tiny", input="Hello there", instructions="Be brief.")
    assert counted.input_tokens == len(live.llm.render([{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": "Hello there"}], None)[1])
    client.responses.delete(r.id)
    for rid in (r.id, "resp_" + "0" * 24, "resp_" + "G" * 24, "resp_..", "x" * 300):
        with pytest.raises(openai.NotFoundError) as info:
            client.responses.retrieve(rid)
        assert info.value.body["message"].startswith("no stored response with that id")
    off = client.responses.create(model="tiny", input="Hi", max_output_tokens=1, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(off.id)


def test_image_as_data_url_matches_chat(client):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 28, 3), dtype=np.uint8)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    r = client.responses.create(model="tiny", max_output_tokens=4, temperature=0, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": url, "detail": "auto"}, {"type": "input_text", "text": "What?"}]}])
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]
    c = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": parts}])
    assert r.usage.input_tokens == c.usage.prompt_tokens > 60 and r.output_text == c.choices[0].message.content


def test_forced_call_then_output_by_history_and_by_previous_response_id(client):
    user = {"role": "user", "content": f"{uuid.uuid4().hex}: weather in Paris?"}
    r = client.responses.create(model="tiny", input=[user], tools=[TOOL], tool_choice="required",
                                max_output_tokens=40, temperature=0)
    calls = [i for i in r.output if i.type == "function_call"]
    assert r.status == "completed" and len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments)["city"] in ("Paris", "Rome") and calls[0].call_id.startswith("call_")
    result = {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp": 3}'}
    chained = client.responses.create(model="tiny", previous_response_id=r.id, input=[result], tools=[TOOL],
                                      max_output_tokens=3, temperature=0)
    full = client.responses.create(model="tiny", input=[user, *[i.model_dump() for i in r.output], result],
                                   tools=[TOOL], max_output_tokens=3, temperature=0)
    assert chained.previous_response_id == r.id and chained.usage.input_tokens > r.usage.input_tokens
    # the chained prompt reuses turn 1's very ids; a fresh tokenization may merge one more pair at the seam
    assert abs(chained.usage.input_tokens - full.usage.input_tokens) <= 1
    assert chained.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens // 64 * 64 > 0
    assert client.responses.input_items.list(chained.id).data[0].type == "function_call_output"


def test_json_schema_output(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
              "required": ["city", "n"], "additionalProperties": False}
    for seed in range(2):
        r = client.responses.create(model="tiny", input="JSON please", max_output_tokens=60, temperature=1.0,
                                    text={"format": {"type": "json_schema", "name": "w", "schema": schema,
                                                     "strict": True}}, extra_body={"seed": seed})
        obj = json.loads(r.output_text)
        assert set(obj) == {"city", "n"} and isinstance(obj["n"], int) and r.text.format.type == "json_schema"


REASONED = ["Let me", " think", "</think>\n\nI'll check.", *CALL]


def _stream(client, **kw):
    with client.responses.stream(model="tiny", input="Weather?", tools=[TOOL], **kw) as s:
        events = list(s)
        return events, s.get_final_response() if events[-1].type == "response.completed" else events[-1].response


def test_reasoning_text_and_calls_created_and_streamed(client, live, monkeypatch):
    scripted(monkeypatch, REASONED)
    kw = {"reasoning": {"effort": "high", "summary": "auto"}, "max_output_tokens": 50}
    r = client.responses.create(model="tiny", input="Weather?", tools=[TOOL], **kw)
    assert [i.type for i in r.output] == ["reasoning", "message", "function_call"]
    assert r.output[0].content[0].text == "Let me think" and r.output[0].summary[0].text == "Let me think"
    assert r.output_text == "I'll check." and json.loads(r.output[2].arguments) == {"city": "Rome"}
    plain = client.responses.create(model="tiny", input="Weather?", tools=[TOOL], reasoning={"effort": "high"})
    # the output sent back (reasoning item included) renders as the assistant turn the chat template writes
    history = [{"role": "user", "content": "Weather?"}, *[i.model_dump(exclude_none=True) for i in r.output],
               {"type": "function_call_output", "call_id": r.output[2].call_id, "output": "sunny"}]
    back = client.responses.input_tokens.count(model="tiny", input=history, tools=[TOOL], reasoning={"effort": "high"})
    call = {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
    chat = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "I'll check.",
                                                      "reasoning_content": "Let me think", "tool_calls": [call]},
            {"role": "tool", "content": "sunny"}]
    fn = {k: TOOL[k] for k in ("name", "description", "parameters")}
    assert back.input_tokens == len(live.llm.render(chat, True, [{"type": "function", "function": fn}])[1])
    assert plain.output[0].summary == [] and plain.usage.output_tokens_details.reasoning_tokens > 0
    events, final = _stream(client, **kw)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for k in ("output_item.added", "output_item.done", "content_part.added", "content_part.done",
              "reasoning_text.delta", "reasoning_text.done", "reasoning_summary_part.added",
              "reasoning_summary_text.delta", "reasoning_summary_text.done", "reasoning_summary_part.done",
              "output_text.delta", "output_text.done", "function_call_arguments.delta",
              "function_call_arguments.done"):
        assert "response." + k in kinds, k
    seqs = [e.sequence_number for e in events]
    assert seqs == sorted(set(seqs)) and seqs[0] == 0
    added = {e.output_index: e.item.id for e in events if e.type == "response.output_item.added"}
    for e in events:
        if hasattr(e, "item_id"):
            assert added[e.output_index] == e.item_id, e.type
    assert [(i.type, i.id) for i in final.output] == [(i.type, added[n]) for n, i in enumerate(final.output)]
    assert [_shape(i) for i in final.output] == [_shape(i) for i in r.output]


def _shape(item) -> tuple:
    """An output item without its fresh ids."""
    if item.type == "function_call":
        return item.type, item.status, item.name, item.arguments
    texts = [c.text for c in item.content or []] + [s.text for s in getattr(item, "summary", [])]
    return item.type, item.status, texts


def test_stream_incomplete_and_failed(client, live, monkeypatch):
    events, final = _stream(client, max_output_tokens=3, extra_body={"ignore_eos": True}, tool_choice="none")
    assert events[-1].type == "response.incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.usage.output_tokens == 3 and final.output[0].status == "incomplete"
    from deltarun.outputs import StreamDelta
    from deltarun.server import streaming

    async def broken(llm, req, deadline=None):
        req.tracks[0].token_ids.append(1)
        yield [StreamDelta(0, "partial", [1], None)]
        raise RuntimeError("engine fell over")

    monkeypatch.setattr(streaming, "run_request", broken)
    with client.responses.stream(model="tiny", input="Hi") as s:
        events = list(s)
    kinds = [e.type for e in events]
    assert kinds[-2:] == ["error", "response.failed"] and "response.output_text.delta" in kinds
    assert "internal error" in events[-2].message and events[-1].response.status == "failed"
    monkeypatch.undo()
    assert client.responses.create(model="tiny", input="Hi", max_output_tokens=1).status in ("completed", "incomplete")


def test_truncation(client, live, monkeypatch):
    ctx = live.llm.max_model_len
    short = len(live.llm.render([{"role": "user", "content": "Now?"}], None)[1])
    turns = [{"role": "user", "content": "An earlier question " * 20}, {"role": "assistant", "content": "Yes."},
             {"role": "user", "content": "Now?"}]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="tiny", input=turns, max_output_tokens=ctx - short - 2)
    assert "truncation" in info.value.body["message"] and info.value.body["code"] == "context_length_exceeded"
    scripted(monkeypatch, ["Fine."])  # the prompt is built for real; thousands of noise tokens are not needed
    r = client.responses.create(model="tiny", input=turns, max_output_tokens=ctx - short - 2, truncation="auto")
    assert r.usage.input_tokens == short and r.output_text == "Fine."


def test_bad_input_is_openai_shaped_and_server_keeps_serving(client, live):
    bad = [dict(input=[{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]),
           dict(input=[{"type": "input_file", "file_id": "file-1"}]), dict(input=[{"role": "wizard", "content": "x"}]),
           dict(input="x", temperature=-1), dict(input="x", tools=[{"type": "web_search"}],
                                                 tool_choice={"type": "web_search"}),
           dict(input="x", tools=[TOOL], tool_choice={"type": "function", "name": "missing"}),
           dict(input="x", text={"format": {"type": "json_schema", "name": "x"}}), dict(input=[]),
           dict(input="x", background=True), dict(input="x", max_output_tokens=0)]
    for kw in bad:
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model="tiny", **kw)
        err = info.value.body
        assert isinstance(err, dict) and err["message"] and err["type"] == "invalid_request_error", kw
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="x")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", input="x", previous_response_id="resp_" + "f" * 24)
    r = httpx.post(live.url + "/v1/responses", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert client.responses.create(model="tiny", input="x", tools=[TOOL, {"type": "web_search"}],
                                   max_output_tokens=1).tools[0].name == "get_weather"


def _answers_end(monkeypatch, steps: int = 40) -> None:
    """The real engine, greedy, but an answer that has not ended after `steps` steps ends there as "stop"
    (random weights never write EOS, and the Agents SDK takes an incomplete answer for a failure). The
    forced tool call ends on its own: its grammar allows only EOS after the call."""
    from contextlib import aclosing

    from deltarun.outputs import StreamDelta
    from deltarun.server import streaming

    real = streaming.run_request

    async def ending(llm, req, deadline=None):
        async with aclosing(real(llm, req, deadline)) as it:
            n = 0
            async for deltas in it:
                n += 1
                if n == steps and not req.finished:
                    for tr in req.tracks:
                        tr.finish_reason = "stop"
                    yield [StreamDelta(d.index, d.text, d.token_ids, "stop") for d in deltas]
                    return
                yield deltas

    monkeypatch.setattr(streaming, "run_request", ending)


def _agent(live):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    seen = []

    @function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"Sunny in {city}, 21 C"

    model = OpenAIResponsesModel("tiny", openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused",
                                                            max_retries=0))
    agent = Agent(name="weather", instructions=f"{uuid.uuid4().hex} Answer weather questions.", model=model,
                  tools=[get_weather], model_settings=ModelSettings(tool_choice="required", temperature=0,
                                                                    max_tokens=60))
    return agent, seen


def test_agents_sdk_calls_the_tool_and_feeds_the_result_back(live, client, monkeypatch):
    from agents import Runner

    _answers_end(monkeypatch)
    agent, seen = _agent(live)

    async def both():  # one event loop: the SDK's client keeps its connections
        result = await Runner.run(agent, "Weather in Paris?")
        run = Runner.run_streamed(agent, "Weather in Paris?")
        kinds = {e.type async for e in run.stream_events()}
        return result, run, kinds

    result, run, kinds = asyncio.run(both())
    assert len(seen) == 2 and len(result.raw_responses) == 2 and isinstance(result.final_output, str)
    second = client.responses.input_items.list(result.raw_responses[1].response_id, order="asc").data
    outputs = [i for i in second if i.type == "function_call_output"]
    assert len(outputs) == 1 and outputs[0].output == f"Sunny in {seen[0]}, 21 C"
    assert "raw_response_event" in kinds and run.final_output == result.final_output and result.final_output


def test_agents_sdk_previous_response_id_hits_the_prefix_cache(live, monkeypatch):
    from agents import Runner

    _answers_end(monkeypatch)
    agent, seen = _agent(live)
    result = asyncio.run(Runner.run(agent, "Weather in Rome?", auto_previous_response_id=True))
    first, second = (r.usage for r in result.raw_responses)
    assert len(seen) == 1 and first.input_tokens_details.cached_tokens == 0
    assert second.input_tokens_details.cached_tokens >= first.input_tokens // 64 * 64 > 0


def test_effort_switches_thinking_and_openapi_declares_bodies(client):
    def count(effort):
        return client.responses.input_tokens.count(model="tiny", input="Hi", reasoning={"effort": effort}).input_tokens

    assert count("high") == count("none") - 2 == count("minimal") - 2  # "<think>\n" vs "<think>\n\n</think>\n\n"
    from deltarun.server import create_app

    paths = create_app().openapi()["paths"]
    for path in ("/v1/responses", "/v1/responses/input_tokens"):
        assert "requestBody" in paths[path]["post"], path
    assert {"get", "delete"} <= set(paths["/v1/responses/{response_id}"])


def test_store_is_a_bounded_lru():
    from deltarun.server.errors import APIError
    from deltarun.server.responses_store import ResponseStore, StoredResponse

    store, ids = ResponseStore(max_entries=2), [f"resp_{i:024x}" for i in range(3)]
    for rid in ids[:2]:
        store.put(rid, StoredResponse({"id": rid}, [], []))
    store.get(ids[0])  # now the most recently used: the other one goes first
    store.put(ids[2], StoredResponse({"id": ids[2]}, [], []))
    with pytest.raises(APIError):
        store.get(ids[1])
    assert store.get(ids[0]).response["id"] == ids[0] and len(store) == 2
    small = ResponseStore(max_bytes=1000)
    small.put(ids[0], StoredResponse({"id": ids[0]}, [], [], "x" * 600))
    small.put(ids[1], StoredResponse({"id": ids[1]}, [], [], "x" * 600))
    assert len(small) == 1 and small.get(ids[1])
