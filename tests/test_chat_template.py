"""ChatTemplate renders byte-for-byte what transformers' apply_chat_template(tokenize=False) renders."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from deltarun.processor.chat_template import ChatTemplate

DATA = Path(__file__).resolve().parent.parent / "deltarun" / "data"
TEMPLATES = {"official": "chat_template.jinja", "small": "chat_template.0.8B-2B.jinja"}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get current weather for a city — «météo»",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web <fast>",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["query"]}}},
]

CONVERSATIONS = {
    "simple": [{"role": "user", "content": "Hi"}],
    "system": [{"role": "system", "content": "  You are helpful.\n"}, {"role": "user", "content": "Hello there  "}],
    "multi_turn_think_in_content": [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
    ],
    "reasoning_content_after_last_query": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "old thoughts"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "partial", "reasoning_content": "\n  new thoughts \n"},
    ],
    "tool_loop": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Paris and news?"},
        {"role": "assistant", "content": None, "reasoning_content": "Need weather.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "Paris", "unit": "celsius"}}},
            {"type": "function", "function": {"name": "search",
                                              "arguments": {"query": "news", "limit": 3, "flag": True,
                                                            "extra": None, "list": [1, "é"], "obj": {"k": "v"}}}},
        ]},
        {"role": "tool", "content": '{"temp": 18, "sky": "cloudy"}'},
        {"role": "tool", "content": "No news — «rien»."},
        {"role": "assistant", "content": "Let me check more.", "tool_calls": [
            {"name": "search", "arguments": {"query": "more"}}]},
        {"role": "tool", "content": "R3"},
    ],
    "multimodal": [
        {"role": "user", "content": [
            {"type": "image", "image": "file:///a.png"},
            {"type": "text", "text": "Describe this "},
            {"type": "video", "video": "file:///b.mp4"},
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
            {"type": "text", "text": "and that."},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "A picture."}]},
        {"role": "user", "content": [{"type": "text", "text": "More?"}, {"image": "c.png"}]},
    ],
    "reasoning_alias": [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "reasoning": "via alias"},
        {"role": "user", "content": "<tool_response>\nx\n</tool_response>"},
    ],
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "<|im_end|>": 1}, unk_token="<|endoftext|>"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def _reference(hf_tokenizer, template_name: str, messages, **kwargs) -> str:
    source = (DATA / TEMPLATES[template_name]).read_text()
    return hf_tokenizer.apply_chat_template(copy.deepcopy(messages), chat_template=source, tokenize=False, **kwargs)


@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(hf_tokenizer, template_name, conv, enable_thinking, add_generation_prompt):
    messages = CONVERSATIONS[conv]
    template = ChatTemplate.builtin(thinking_default=template_name == "official")
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    tools = TOOLS if conv == "tool_loop" else None
    want = _reference(hf_tokenizer, template_name, messages, tools=tools,
                      add_generation_prompt=add_generation_prompt, **kwargs)
    before = copy.deepcopy(messages)
    got = template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                          enable_thinking=enable_thinking)
    assert got == want
    assert messages == before  # caller's messages untouched


@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
def test_extra_kwargs_match(hf_tokenizer, template_name):
    messages = CONVERSATIONS["multimodal"]
    template = ChatTemplate.builtin(thinking_default=template_name == "official")
    want = _reference(hf_tokenizer, template_name, messages, add_generation_prompt=True, add_vision_id=True)
    assert template.render(messages, add_vision_id=True) == want
    assert "Picture 2: " in want and "Video 1: " in want


def test_known_renders():
    official = ChatTemplate.builtin(thinking_default=True)
    small = ChatTemplate.builtin(thinking_default=False)
    hi = [{"role": "user", "content": "Hi"}]
    assert official.render(hi) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert official.render(hi, enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert small.render(hi).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert small.render(hi, enable_thinking=True).endswith("<|im_start|>assistant\n<think>\n")
    assert official.thinking_default is True and small.thinking_default is False
    tools_prompt = official.render(hi, tools=TOOLS[:1])
    assert json.dumps(TOOLS[0], ensure_ascii=False) in tools_prompt  # tojson: no HTML escaping, no \u escapes


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "assistant", "content": "x"}], "No user query found in messages."),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
         "System message must be at the beginning."),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "Unexpected message role."),
        ([{"role": "system", "content": [{"type": "image", "image": "x"}]}, {"role": "user", "content": "a"}],
         "System message cannot contain images."),
        ([{"role": "user", "content": 5}], "Unexpected content type."),
    ],
)
def test_template_errors_become_value_errors(messages, message):
    with pytest.raises(ValueError) as info:
        ChatTemplate.builtin(thinking_default=True).render(messages)
    assert str(info.value) == message


def test_empty_conversation():
    with pytest.raises(ValueError):
        ChatTemplate.builtin(thinking_default=True).render([])


def test_from_folder(tmp_path):
    assert ChatTemplate.from_folder(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A{{ messages[0].content }}"}))
    assert ChatTemplate.from_folder(tmp_path).render([{"role": "user", "content": "b"}]) == "Ab"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<E>",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}],
    }))
    assert ChatTemplate.from_folder(tmp_path).render([{"role": "user", "content": "b"}]) == "D<E>"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages|length }}")
    assert ChatTemplate.from_folder(tmp_path).render([{"role": "user", "content": "b"}]) == "J1"


def test_environment_features():
    source = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|{{ messages[0] | tojson }}|{{ strftime_now('%Y') | length }}"
        "|{% generation %}G{% endgeneration %}|{{ dict(a=1) | tojson }}"
    )
    messages = [{"role": "user", "content": "<é>"}] * 4
    assert ChatTemplate(source).render(messages) == '2|{"role": "user", "content": "<é>"}|4|G|{"a": 1}'
    with pytest.raises(Exception):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render(messages)
    with pytest.raises(ValueError):
        ChatTemplate("{{ raise_exception('boom') }}").render(messages)
    with pytest.raises(Exception):  # the sandbox refuses attribute games
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(messages)
