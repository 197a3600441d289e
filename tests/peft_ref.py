"""The reference for the fine-tuning tests: transformers + peft on the same checkpoint, one backward pass."""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3_5ForConditionalGeneration

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
       "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"]


def peft_model(folder, seed: int = 0, **lora):
    """peft's LoRA model on the reference, fp32, with random A and B (peft zero-inits B, which would leave A's
    gradient zero and hide mistakes)."""
    ref = Qwen3_5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(ref, LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def lora_state(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors (or their gradients) under the names peft saves them with."""
    return {n.replace(".default", ""): (p.grad if grads else p.detach().clone())
            for n, p in model.named_parameters() if "lora_" in n}


def peft_gradients(model, ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean next-token loss over the tokens where `loss_mask` is set (labels -100 elsewhere, as transformers
    takes them) and the LoRA gradients of one backward pass."""
    model.zero_grad()
    labels = torch.where(loss_mask, ids, torch.tensor(-100))
    out = model(input_ids=ids[None], labels=labels[None])
    out.loss.backward()
    return out.loss.item(), lora_state(model, grads=True)
