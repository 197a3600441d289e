"""Adapters made by peft itself for the LoRA tests, and the reference's log-probs and greedy tokens."""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3_5ForCausalLM as HFCausalLM
from transformers import Qwen3_5ForConditionalGeneration

N_PROMPT, N_GEN = 40, 32


def _reference(folder, text_only: bool):
    cls = HFCausalLM if text_only else Qwen3_5ForConditionalGeneration
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def make_adapter(base, text_only: bool, out, seed: int = 0, **lora):
    """peft's own adapter on the reference model, A and B random; returns (PeftModel, folder)."""
    model = get_peft_model(_reference(base, text_only), LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 * p.shape[1] ** -0.5)
    model.save_pretrained(out)
    return model.eval(), out


def _ids(vocab: int, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (N_PROMPT,), generator=torch.Generator().manual_seed(seed)).tolist()


def _ref_logprobs(model, ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def _ref_greedy(model, ids, n=N_GEN):
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()
