"""deltarun: a local, private, offline inference engine for the Qwen3.5 Small models.

Public API: `LLM` (generate / chat and their streaming forms), `SamplingParams`, `LoRARequest` (an adapter
per request) and the result types.
"""
from .lora_request import LoRARequest
from .outputs import ChatCompletion, ChatOutput, CompletionOutput, Logprob, RequestOutput, StreamDelta
from .sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "LoRARequest", "RequestOutput", "CompletionOutput", "Logprob", "ChatOutput",
           "ChatCompletion", "StreamDelta"]


def __getattr__(name: str):
    if name == "LLM":  # imported lazily: loading the engine pulls in torch and the processors
        from .llm import LLM
        return LLM
    raise AttributeError(f"module 'deltarun' has no attribute {name!r}")
