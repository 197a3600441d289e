"""LoRA fine-tuning (deltarun/train/, `deltarun finetune`) against the reference, not against itself.

- one step's LoRA gradients equal transformers + peft's (fp32, tiny model, every target family, same adapter);
- a packed row's loss and gradients equal the sum of its examples' alone (no state crosses examples);
- the loss mask covers exactly the assistant text, checked against strings written out here;
- a run stopped at step k and resumed equals the uninterrupted run;
- the saved folder loads in peft and in deltarun with the same log-probs;
- the command line: a run end to end, and one-line errors with exit code 1.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft_ref import ALL, lora_state, peft_gradients, peft_model

from deltarun.processor.chat_template import ChatTemplate
from deltarun.processor.tokenizer import Tokenizer
from deltarun.train.data import DataError, Example, Renderer, encode, labels_of, pack, read_jsonl
from deltarun.train.forward import Row, TrainForward
from deltarun.train.loop import finetune
from deltarun.train.lora import LoRASpec, TrainableLoRA
from deltarun.weights.loader import load_model

CONVS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                  {"role": "assistant", "content": "A1", "reasoning_content": "r1"},
                  {"role": "user", "content": "Q2"},
                  {"role": "assistant", "content": "A2", "reasoning_content": "r2"}]},
    {"messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "get_w", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": "sunny"},
                  {"role": "assistant", "content": "It is sunny."}],
     "tools": [{"type": "function", "function": {"name": "get_w", "parameters": {
         "type": "object", "properties": {"city": {"type": "string"}}}}}]},
]
# What the model writes in each assistant turn, as the template renders it (0.8B/2B template, thinking off):
# earlier rounds lose their reasoning; the last round keeps it, after the prompt's "<think>" token.
EXPECTED = [
    ["Hello there.<|im_end|>"],
    ["A1<|im_end|>", "\nr2\n</think>\n\nA2<|im_end|>"],
    ["<tool_call>\n<function=get_w>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call><|im_end|>",
     "It is sunny.<|im_end|>"],
]


def _runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_loss_mask_is_the_assistant_text():
    template, tok = ChatTemplate.builtin(thinking_default=False), Tokenizer.builtin()
    renderer = Renderer(template, tok)
    for conv, expected in zip(CONVS, EXPECTED):
        ids, mask = encode(conv, renderer, tok)
        assert [tok.decode(r) for r in _runs(ids, mask)] == expected
        full = template.render(conv["messages"], tools=conv.get("tools"), add_generation_prompt=False)
        assert tok.decode(ids) == full  # every token is the template's rendering, nothing added or lost


def test_bad_data_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(CONVS[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        read_jsonl(path)
    renderer = Renderer(ChatTemplate.builtin(thinking_default=False), Tokenizer.builtin())
    with pytest.raises(ValueError, match="no assistant message"):
        encode({"messages": [{"role": "user", "content": "hi"}]}, renderer, Tokenizer.builtin())


@pytest.fixture(scope="module")
def fp32_model(tiny_ckpt):
    model = load_model(tiny_ckpt, dtype="float32", device="cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _ours(model, state, row: Row, checkpointing=True, mean=False):
    """(loss, LoRA gradients by peft name): summed over the row's loss tokens, or their mean."""
    lora = TrainableLoRA(model, LoRASpec(r=4, alpha=8, target_modules=ALL), text_only=False)
    lora.load_peft_tensors(state)
    loss = TrainForward(model, lora, torch.float32, checkpointing).loss_sum(row)
    if mean:
        loss = loss / row.loss_tokens
    loss.backward()
    grads = {}
    for n, a, b in zip(lora.names, lora.A, lora.B):
        grads[f"base_model.model.{n}.lora_A.weight"], grads[f"base_model.model.{n}.lora_B.weight"] = a.grad, b.grad
    return loss.item(), grads


def _example(n: int, seed: int) -> Example:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, generator=g) < 0.6).tolist()
    mask[0] = False
    return Example(torch.randint(0, 1024, (n,), generator=g).tolist(), mask, seed)


def test_gradients_match_peft(tiny_ckpt, fp32_model):
    ex = _example(150, 1)  # > 2 chunks of the delta rule, not a multiple of 64
    ref = peft_model(tiny_ckpt, r=4, lora_alpha=8, target_modules=ALL)
    ref_loss, ref_grads = peft_gradients(ref, torch.tensor(ex.ids), torch.tensor(ex.mask))
    ids, labels = labels_of(ex, 1000)
    row = Row(ids, labels, [len(ids)])
    loss, grads = _ours(fp32_model, lora_state(ref), row, mean=True)
    assert set(grads) == set(ref_grads) and len(grads) == 2 * 38  # 3 DeltaNet layers × 8, 2 attention × 7
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for k, g in ref_grads.items():
        # relative to each tensor's largest entry: fp32 rounding alone reaches ~5e-5 of it on some tensors
        err = (grads[k] - g).abs().max().item() / g.abs().max().item()
        assert err <= 1e-4, f"{k}: {err}"


def test_packed_equals_unpacked(fp32_model):
    torch.manual_seed(0)
    examples = [_example(n, 10 + i) for i, n in enumerate((70, 33, 129))]
    state = {k: torch.randn_like(v) * 0.1 for k, v in TrainableLoRA(
        fp32_model, LoRASpec(r=4, alpha=8, target_modules=ALL), text_only=False).peft_tensors().items()}
    rows = pack(examples, 512)
    assert len(rows) == 1 and rows[0].lengths == [70, 33, 129]
    packed_loss, packed_grads = _ours(fp32_model, state, rows[0], checkpointing=False)
    alone = [_ours(fp32_model, state, pack([ex], 512)[0]) for ex in examples]
    assert abs(packed_loss - sum(a[0] for a in alone)) <= 1e-5 * packed_loss
    for k, g in packed_grads.items():
        total = sum(a[1][k] for a in alone)
        assert (g - total).abs().max() <= 1e-5 * total.abs().max(), k


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft") / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CONVS))
    return path


KW = dict(rank=4, alpha=8, steps=3, batch_tokens=512, lr=1e-2, compute="fp32", progress=False)


@pytest.fixture(scope="module")
def trained(chat_ckpt, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "adapter"
    res = finetune(chat_ckpt, data_file, out, **KW)
    assert res.steps == 3 and res.losses[-1] < res.losses[0]
    return out


def test_resume_equals_uninterrupted(chat_ckpt, data_file, trained, tmp_path):
    out = tmp_path / "resumed"
    assert finetune(chat_ckpt, data_file, out, stop_after=1, **KW).steps == 1
    assert not (out / "adapter_model.safetensors").exists() and (out / "checkpoint").is_dir()
    finetune(chat_ckpt, data_file, out, resume=True, **KW)
    from safetensors.torch import load_file
    a, b = load_file(trained / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="other settings"):
        finetune(chat_ckpt, data_file, out, resume=True, **{**KW, "lr": 5e-3})


def test_adapter_loads_in_peft_and_deltarun(chat_ckpt, trained):
    from peft import PeftModel
    from transformers import Qwen3_5ForConditionalGeneration

    from deltarun import LLM, SamplingParams

    cfg = json.loads((trained / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(ALL) and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    ids = Tokenizer.from_folder(chat_ckpt).encode("<|im_start|>user\nWeather in Paris?<|im_end|>\n")
    ref = PeftModel.from_pretrained(
        Qwen3_5ForConditionalGeneration.from_pretrained(chat_ckpt, dtype=torch.float32), trained).eval()

    def ref_lp():
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]

    out = LLM(str(chat_ckpt), dtype="float32", device="cpu", lora=str(trained)).generate(
        ids, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    ours = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])])
    assert (ours - ref_lp()).abs().max() <= 1e-4
    with ref.disable_adapter():  # training moved the model: the comparison is not of two base models
        assert (ours - ref_lp()).abs().max() > 1e-3


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "deltarun.cli", "finetune", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli_end_to_end_and_errors(chat_ckpt, data_file, tmp_path, capsys):
    r = _cli(chat_ckpt, data_file, tmp_path / "out", "--steps", "1", "--rank", "2", "--target-modules",
             "q_proj,in_proj_qkv,down_proj")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["target_modules"] == [
        "down_proj", "in_proj_qkv", "q_proj"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CONVS[0]) + "\n\n" + '{"messages": [}\n')
    r = _cli(chat_ckpt, bad, tmp_path / "o")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "bad.jsonl:3: not valid JSON" in r.stderr, r.stderr
    from deltarun.cli.main import main  # the same error path, in process (each subprocess costs seconds)

    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    for args, msg in (([bad], "bad.jsonl:1: no assistant message"), ([tmp_path / "none.jsonl"], "does not exist"),
                      ([data_file, "--rank", "0"], "rank must be at least 1")):
        assert main(["finetune", str(chat_ckpt), str(args[0]), str(tmp_path / "o"), *args[1:]]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err
