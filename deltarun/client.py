"""The engine-client seam: everything an HTTP route may call on a model, as one `EngineClient` protocol.

Routes never touch the engine or `AsyncLLM`: `ServerState.use` hands them an `EngineClient` and they call
only the names below. Today `AsyncLLM` (async_llm.py: the engine on a thread of this process) stands
behind it; a remote replica (Ray) can stand behind it later by providing the same names, without a route
changing. The protocol has two halves:

- the front end, which runs next to the routes whatever the engine is: the tokenizer and chat template,
  `render` (messages → prompt), `prepare_media` / `load_vision` (images and videos), `chat_params`
  (the model card's sampling defaults) and `prepare` (tokenize + validate → `RequestState`; nothing is
  sent to the engine yet, so bad input fails before any response byte; a request's LoRA adapter rides on
  it: `AdapterClient` below);
- the engine: `stream(req)` submits a prepared request and yields each step's new text (closing the
  iterator aborts it; request_stream.py is the one loop behind it), `abort`, `stats` (counters for
  /metrics), `model_info` (what Ollama's listings show), `max_model_len` and `shutdown`.

`RequestObserver` is what `stream` reports a request's life to (the server's metrics). This module
imports no engine code: the types it names are imported for type checking only.
"""
from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .config import ModelConfig
    from .inputs import MultiModalInput
    from .outputs import StreamDelta
    from .processor.chat_template import ChatTemplate
    from .processor.mrope import VisionTokens
    from .processor.multimodal import MediaRef
    from .processor.output import RequestState
    from .processor.tokenizer import Tokenizer
    from .processor.video import VideoProcessorConfig
    from .processor.vision import ImageProcessorConfig
    from .sampling import SamplingParams


class RequestObserver(Protocol):
    """Told about each request `EngineClient.stream` runs (server/metrics.py `Metrics` is one)."""

    def request_started(self) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def request_finished(self, seconds: float, prompt: int, generated: int, ok: bool) -> None: ...


@dataclass(frozen=True)
class EngineStats:
    """The engine's counters at one moment (read without locking: plain ints)."""

    requests_waiting: int
    sequences_running: int
    prefix_cache_hits: int
    prefix_cache_hit_tokens: int
    prefix_cache_bytes: int
    preemptions: int
    prompt_tokens: int
    spec_steps: int = 0  # MTP speculative decoding; 0 when it is off
    spec_drafted: int = 0
    spec_accepted: int = 0
    # what running requests hold, all 0 once the engine is idle (the soak benchmark checks that)
    requests_in_engine: int = 0  # requests the engine still tracks (waiting, prefilling or decoding)
    state_slots_used: int = 0  # DeltaNet state slots held (of max_num_seqs)
    kv_cache_bytes: int = 0  # KV (+ MTP context) bytes of the sequences holding a slot, slots themselves excluded
    prefix_cache_budget: int = 0  # the prefix cache's byte budget (prefix_cache_bytes stays within it)


@dataclass(frozen=True)
class ModelInfo:
    """What the loaded weights are, for listings (Ollama's details, /api/ps)."""

    parameters: int  # every parameter tensor's elements (quantized weights as stored)
    quant_bits: int | None  # the narrowest weight-only quantization (4, 8), None when not quantized
    dtype: str  # of the parameters, e.g. "bfloat16"
    device: str  # "cpu" | "cuda" | ...


class EngineClient(Protocol):
    """One loaded model as the routes see it (see the module docstring for the two halves)."""

    # -- front end: identity, text and media (runs in the server process) -----------------------
    path: Path  # the checkpoint folder (or GGUF file)
    config: ModelConfig
    tokenizer: Tokenizer
    vision_tokens: VisionTokens
    image_config: ImageProcessorConfig
    video_config: VideoProcessorConfig

    @property
    def template(self) -> ChatTemplate: ...

    def render(self, messages: list[dict[str, Any]], enable_thinking: bool | None = None,
               tools: list[dict] | None = None, **kwargs: Any) -> tuple[str, list[int], bool]:
        """(prompt text, prompt ids, whether thinking is on) for a conversation without media."""
        ...

    def load_vision(self) -> None:
        """Load the vision tower (once); ValueError when the checkpoint has none."""
        ...

    def prepare_media(self, ids: list[int], media: list[MediaRef]) -> tuple[list[int], MultiModalInput | None]:
        """Rendered prompt ids + the conversation's media → (expanded ids, the engine's media input)."""
        ...

    @staticmethod
    def chat_params(params: SamplingParams | None, thinking: bool) -> SamplingParams:
        """Unset sampling knobs take the model card's recommended values for the mode."""
        ...

    def prepare(self, prompt: str | list[int], params: SamplingParams | None,
                mm: MultiModalInput | None = None) -> RequestState:
        """Tokenize, fill defaults and validate (ValueError → 400); the engine is not touched yet."""
        ...

    # -- engine: submit, stream, abort, observe --------------------------------------------------
    @property
    def max_model_len(self) -> int:
        """The context length: prompt + generated tokens of one sequence."""
        ...

    def stream(self, req: RequestState, observer: RequestObserver | None = None
               ) -> AsyncGenerator[list[StreamDelta], None]:
        """Submit `req` and yield each step's new text per sequence (`req` keeps the totals: tracks,
        token ids, log-probs). Closing the iterator early, or cancelling it, aborts the request."""
        ...

    def abort(self, request_id: str) -> None:
        """End a request now, wherever it is (a stream's reader then sees it end)."""
        ...

    def stats(self) -> EngineStats:
        ...

    def model_info(self) -> ModelInfo:
        ...

    def shutdown(self) -> None:
        """Stop the engine; nothing may be submitted afterwards."""
        ...


class AdapterClient:
    """A model's `EngineClient` whose requests run with one of its LoRA adapters (registered on the engine
    under `adapter`): every name is the base client's, except `prepare`, which marks the request. A Ray
    replica's client works the same way, the adapter travelling on the request."""

    def __init__(self, base: Any, adapter: str):
        self._base, self.adapter = base, adapter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def prepare(self, prompt: str | list[int], params: SamplingParams | None,
                mm: MultiModalInput | None = None) -> RequestState:
        req = self._base.prepare(prompt, params, mm)
        req.adapter = self.adapter
        return req
