"""Tool-call parser on a corpus of realistic Qwen3.5 outputs, whole and streamed in every chunking."""
import json
import random

import pytest

from deltarun.processor.tool_calls import ToolCallParser, convert_value, parse_tool_calls

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "ratio": {"type": "number"}, "opts": {"type": "object"}, "tags": {"type": "array"},
        "note": {"type": ["string", "null"]}}}}},
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}},
]

CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"

# (generated text, expected content, expected [(name, arguments)])
CORPUS = [
    ("Hello there!", "Hello there!", []),
    ("  spaced  \n", "  spaced  \n", []),
    (CALL, "", [("get_weather", {"city": "Paris"})]),
    ("Let me check.\n\n" + CALL, "Let me check.", [("get_weather", {"city": "Paris"})]),
    (CALL + "\n" + CALL.replace("Paris", "Rome"), "",
     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
    # the template's own rendering of typed arguments
    ("<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n</parameter>\n<parameter=metric>\nTrue\n"
     "</parameter>\n<parameter=ratio>\n0.5\n</parameter>\n<parameter=opts>\n{\"x\": \"y\"}\n</parameter>\n"
     "<parameter=tags>\n[1, 2]\n</parameter>\n<parameter=note>\nNone\n</parameter>\n</function>\n</tool_call>",
     "", [("get_weather", {"days": 3, "metric": True, "ratio": 0.5, "opts": {"x": "y"}, "tags": [1, 2],
                           "note": None})]),
    # multi-line string values keep their inner newlines
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nline one\nline two\n</parameter>\n</function>\n"
     "</tool_call>", "", [("get_weather", {"city": "line one\nline two"})]),
    # JSON-style call inside the block (Qwen3 / Hermes habit)
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>', "",
     [("get_weather", {"city": "Oslo", "days": 2})]),
    ('<tool_call>{"name": "noop", "arguments": "{}"}</tool_call>', "", [("noop", {})]),
    # no <tool_call> wrapper, missing </parameter>, stray closing tag
    ("<function=get_weather>\n<parameter=city>\nLima\n</function>\n</tool_call>", "",
     [("get_weather", {"city": "Lima"})]),
    # two functions in one block, a function with no parameters
    ("<tool_call>\n<function=noop>\n</function>\n<function=get_weather>\n<parameter=city>\nX\n</parameter>\n"
     "</function>\n</tool_call>", "", [("noop", {}), ("get_weather", {"city": "X"})]),
    # unknown function / parameter: still a call; unknown params stay strings unless JSON containers
    ("<tool_call>\n<function=other>\n<parameter=a>\n5\n</parameter>\n<parameter=b>\n{\"k\": 1}\n</parameter>\n"
     "</function>\n</tool_call>", "", [("other", {"a": "5", "b": {"k": 1}})]),
    # unparseable: returned as content, verbatim
    ("<tool_call>\nnot a call\n</tool_call>", "<tool_call>\nnot a call\n</tool_call>", []),
    ("<tool_call>\n{\"name\": broken json}</tool_call>", "<tool_call>\n{\"name\": broken json}</tool_call>", []),
    # cut short by max_tokens in the middle of a call: content, not a half call
    ("Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", "Sure.<tool_call>\n<function="
     "get_weather>\n<parameter=city>\nPar", []),
    # text that merely looks like a tag start
    ("a < b and <tool is not a call", "a < b and <tool is not a call", []),
    # a wrong type for the schema keeps the raw string
    ("<tool_call>\n<function=get_weather>\n<parameter=days>\nmany\n</parameter>\n</function>\n</tool_call>", "",
     [("get_weather", {"days": "many"})]),
]


def _norm(calls):
    return [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("text,content,calls", CORPUS)
def test_whole(text, content, calls):
    got_content, got_calls = parse_tool_calls(text, TOOLS)
    assert got_content == content
    assert _norm(got_calls) == calls


def _stream(text, sizes):
    parser = ToolCallParser(TOOLS)
    content, calls, i = "", [], 0
    for n in sizes:
        c, new = parser.feed(text[i : i + n])
        content, calls, i = content + c, calls + new, i + n
    c, new = parser.finish()
    return content + c, calls + new


@pytest.mark.parametrize("text,content,calls", CORPUS)
def test_streamed_char_by_char_and_random_chunks(text, content, calls):
    expected = (content, calls)
    assert (lambda r: (r[0], _norm(r[1])))(_stream(text, [1] * len(text))) == expected
    rng = random.Random(len(text))
    for _ in range(20):
        sizes = []
        while sum(sizes) < len(text):
            sizes.append(rng.randint(1, 12))
        got = _stream(text, sizes)
        assert (got[0], _norm(got[1])) == expected


def test_stream_emits_content_before_call_completes():
    parser = ToolCallParser(TOOLS)
    c, calls = parser.feed("Checking the weather")
    assert c == "Checking the weather" and not calls
    c, calls = parser.feed(" now.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis")
    assert c == " now." and not calls  # the call never leaks into content
    c, calls = parser.feed("\n</parameter>\n</function>\n</tool_call>")
    assert c == "" and _norm(calls) == [("get_weather", {"city": "Paris"})]
    assert json.loads(calls[0].arguments_json) == {"city": "Paris"}


def test_convert_value():
    assert convert_value("42", {"type": "integer"}) == 42
    assert convert_value("4.0", {"type": "integer"}) == 4
    assert convert_value("false", {"type": "boolean"}) is False
    assert convert_value("null", {"type": "integer"}) is None
    assert convert_value("null", {"type": "string"}) == "null"
    assert convert_value("{'a': True}", {"type": "object"}) == {"a": True}
    assert convert_value("7", {"anyOf": [{"type": "integer"}, {"type": "string"}]}) == 7
    assert convert_value("x", {"anyOf": [{"type": "integer"}, {"type": "string"}]}) == "x"
    assert convert_value("1e3", {"type": "number"}) == 1000.0
