"""LoRA fine-tuning of the Qwen3.5 models (`deltarun finetune`): chat JSONL → a PEFT adapter folder.

data.py (JSONL → token ids + assistant-only loss mask → packed rows), lora.py (trainable fp32 adapter weights,
the PEFT folder), forward.py (a differentiable forward of deltarun's model), loop.py (optimizer, schedule,
progress), checkpoint.py (save / resume). Serving and merging adapters is weights/lora.py.
"""
from .loop import Result, TrainConfig, finetune

__all__ = ["finetune", "TrainConfig", "Result"]
