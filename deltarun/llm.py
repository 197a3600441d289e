"""The synchronous Python API, shaped like vLLM's offline `LLM`: generate, chat, and their streams.

Text lives here, at the edge: prompts are tokenized, the chat template rendered, generated ids
detokenized incrementally (processor/output.py), stop strings applied and reasoning split from the
answer. The engine below speaks token ids only. `Frontend` is what the sync `LLM` and the server's
`AsyncLLM` share: loading, prompt preparation and chat rendering. Chat messages may hold image and
video parts (processor/multimodal.py): `render_chat` renders them as placeholders, decodes the media,
expands the placeholders and returns the `MultiModalInput` the engine runs them with; the vision
tower is loaded on the first request that needs it.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .engine.engine import Engine, EngineConfig, StepFailed
from .inputs import MultiModalInput, StepOutput
from .lora_request import LoRARequest
from .outputs import ChatCompletion, ChatOutput, RequestOutput, StreamDelta
from .processor.mrope import VisionTokens
from .processor.multimodal import MediaRef, extract_media, prepare_media
from .processor.output import OutputProcessor, RequestState
from .processor.reasoning import DeltaSplitter, opens_think, split_reasoning
from .processor.tokenizer import Tokenizer
from .processor.video import VideoProcessorConfig
from .processor.vision import ImageProcessorConfig
from .sampling import SamplingParams, card_defaults
from .store.names import is_demo, quant_tag
from .store.resolve import resolve_model
from .threads import set_threads
from .weights.loader import load_model
from .weights.mtp_loader import load_mtp
from .weights.vision_loader import load_vision

if TYPE_CHECKING:
    from .processor.chat_template import ChatTemplate

Prompt = str | list[int]
Messages = list[dict[str, Any]]
DEFAULT_MAX_TOKENS = 32768  # the model cards' recommended output length
# the random-weights demo never ends a turn: unbounded, its first answer would stream noise for ~40 minutes
DEMO_MAX_TOKENS = 256


class Frontend:
    """Model, tokenizer, template and engine for one checkpoint, plus the text-side helpers."""

    def __init__(self, model: str | Path = "qwen3.5:0.8b", *, dtype: str = "auto", device: str = "auto",
                 rope_scaling: dict | str | None = None, quantization: str | None = None,
                 threads: int | None = None, lora: str | Path | None = None, **engine_options: Any):
        """engine_options: fields of `EngineConfig` (max_num_seqs, max_prefill_tokens, max_model_len,
        max_memory, prefix_cache_memory, prefix_block, mtp, num_speculative_tokens, mtp_draft_vocab,
        max_loras, max_cpu_loras, max_lora_rank).
        `rope_scaling`: e.g. "yarn:4" or the model card's rope_parameters dict, to run past the native
        262,144 positions.
        `quantization`: "int8", "int4" or "int4:GROUP" (weight-only, applied while loading; also taken
        from a name's tag such as `qwen3.5:0.8b-int4`). `threads`: CPU threads (default: all cores).
        `lora`: a PEFT LoRA adapter folder applied to every request that names no other (`lora_request`).
        Adapters per request: `generate(..., lora_request=LoRARequest(name, id, folder))`; up to `max_loras`
        distinct adapters share a batch (engine/adapters.py), each of rank ≤ `max_lora_rank` if given."""
        set_threads(threads)
        if quantization is None:
            quantization = quant_tag(str(model))
        self.path = resolve_model(model)
        self.default_max_tokens = DEMO_MAX_TOKENS if is_demo(self.path) else DEFAULT_MAX_TOKENS
        # Where loading converts the weights (a GGUF file, or quantizing while loading) it runs mostly in torch ops
        # that release the GIL, so the tokenizer is built beside it: Q4_0 GGUF cold start 2.72 → 2.44 s (medians of
        # 8 interleaved runs, 2-core Zen 4; 2.36 → 2.29 s of 7 since tiktoken's table is built only for long texts).
        # A plain folder loads in ~0.05 s: there a thread only cost (2.06 → 2.27 s).
        with ThreadPoolExecutor(1) if quantization or (self.path / "gguf.json").is_file() else nullcontext() as pool:
            tok = pool.submit(Tokenizer.from_folder, self.path) if pool else None
            self.model = load_model(self.path, dtype=dtype, device=device, rope_scaling=rope_scaling,
                                    context_length=engine_options.get("max_model_len"), quantization=quantization)
            self.tokenizer = tok.result() if tok else Tokenizer.from_folder(self.path)
        self.config = self.model.config
        self._template: ChatTemplate | None = None
        engine_config = EngineConfig(**engine_options)
        mtp = None if engine_config.mtp == "off" else load_mtp(self.path, dtype=self.model.dtype,
                                                                device=self.model.device)
        self.engine = Engine(self.model, eos_token_ids=self.tokenizer.eos_token_ids,
                             valid_vocab=self.tokenizer.vocab_size, config=engine_config, mtp=mtp)
        self.output = OutputProcessor(self.tokenizer)
        self.default_adapter: str | None = None
        if lora is not None:
            self.default_adapter = self.add_lora(LoRARequest(Path(lora).name or "default", 0, str(lora)))
        self._ids = itertools.count()
        self.vision_tokens = VisionTokens.from_config(self.config)
        self.image_config = ImageProcessorConfig.from_folder(self.path)  # change fields to resize otherwise
        self.video_config = VideoProcessorConfig.from_folder(self.path)

    @property
    def template(self) -> ChatTemplate:
        """The folder's chat template, else the built-in one: built on first use, so raw-text generation never loads
        jinja (45 ms of a cold `generate --raw`). A broken template raises its TemplateError here; the server asks
        for it right after loading, so there it still fails the load."""
        if self._template is None:
            from .processor.chat_template import ChatTemplate

            self._template = ChatTemplate.from_folder(self.path) or ChatTemplate.builtin(
                thinking_default=self.config.text.hidden_size >= 2560)
        return self._template

    def add_lora(self, lora: LoRARequest) -> str:
        """Register a LoRA adapter (read and checked now: LoRAError for a bad folder); returns its name."""
        self.engine.adapters.register(lora.lora_name, lora.lora_path)
        return lora.lora_name

    def list_loras(self) -> list[str]:
        return list(self.engine.adapters.paths)

    def prepare(self, prompt: Prompt, params: SamplingParams | None,
                mm: MultiModalInput | None = None, lora_request: LoRARequest | None = None) -> RequestState:
        """Tokenize, fill the output-length default and validate; the engine is not touched.
        `mm`: the images/videos of a prompt made by `prepare_media` (then `prompt` is its expanded ids).
        `lora_request`: the adapter to run it with (registered on first use); default: `lora`'s, if given."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        room = self.engine.max_model_len - len(ids)
        params = params.with_defaults({"max_tokens": max(0, min(self.default_max_tokens, room))})
        self.engine.check_request(ids, params, mm)
        req = self.output.new_request(str(next(self._ids)), prompt if isinstance(prompt, str) else None,
                                      ids, params)
        req.mm = mm
        req.adapter = self.add_lora(lora_request) if lora_request is not None else self.default_adapter
        return req

    def load_vision(self) -> None:
        """Load the vision tower into the engine (once; ValueError when the checkpoint has none)."""
        if self.engine.vision is None:
            if not self.config.vision:
                raise ValueError(f"{self.path.name} has no vision tower: it cannot read images or videos")
            self.engine.vision = load_vision(self.path, dtype=self.model.dtype, device=self.model.device)

    def prepare_media(self, ids: list[int], media: list[MediaRef]) -> tuple[list[int], MultiModalInput | None]:
        """Rendered prompt ids + the conversation's media (`extract_media`) → (expanded ids, MultiModalInput)."""
        if not media:
            return ids, None
        self.load_vision()
        return prepare_media(ids, media, self.tokenizer.encode, self.vision_tokens, self.image_config,
                             self.video_config)

    def render_chat(self, messages: Messages, enable_thinking: bool | None = None,
                    tools: list[dict] | None = None, **kwargs: Any
                    ) -> tuple[str, list[int], bool, MultiModalInput | None]:
        """`render` for messages that may hold image/video parts: also (expanded ids, their media)."""
        plain, media = extract_media(messages)
        prompt, ids, thinking = self.render(plain, enable_thinking, tools, **kwargs)
        ids, mm = self.prepare_media(ids, media)
        return prompt, ids, thinking, mm

    def render(self, messages: Messages, enable_thinking: bool | None = None, tools: list[dict] | None = None,
               **kwargs: Any) -> tuple[str, list[int], bool]:
        """(prompt text, prompt ids, whether thinking is on) for a conversation."""
        prompt = self.template.render(messages, tools=tools, add_generation_prompt=True,
                                      enable_thinking=enable_thinking, **kwargs)
        thinking = self.template.thinking_default if enable_thinking is None else enable_thinking
        return prompt, self.tokenizer.encode(prompt), thinking

    @staticmethod
    def chat_params(params: SamplingParams | None, thinking: bool) -> SamplingParams:
        """Unset sampling knobs take the model card's recommended values for the mode."""
        return (params or SamplingParams()).with_defaults(card_defaults(thinking))


class LLM(Frontend):
    """`LLM("qwen3.5:0.8b")`, `LLM("/path/to/folder", dtype="float32", device="cpu")`, `LLM("demo")`."""

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """One `RequestOutput` per prompt (a string or a list of token ids); params and adapters (`lora_request`)
        one for all or one per prompt. Prompts with different adapters run in the same batches."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        batch = cast(list[Prompt], prompts)  # one prompt (a str or a list of ints) was wrapped above
        plist = params if isinstance(params, list) else [params] * len(batch)
        if len(plist) != len(batch):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(batch)} prompts")
        loras = _per_prompt(lora_request, len(batch))
        return self._run([self.prepare(p, sp, lora_request=lr)  # all validated before any runs
                          for p, sp, lr in zip(batch, plist, loras)])

    def _run(self, reqs: list[RequestState]) -> list[RequestOutput]:
        by_id = {r.request_id: r for r in reqs}
        for r in reqs:
            self.engine.add_request(r.request_id, r.prompt_ids, r.params, r.mm, r.adapter)
        try:
            while self.engine.has_unfinished():
                for step in self._step():
                    if step.request_id in by_id:
                        self.output.update(by_id[step.request_id], step, self.engine.finish)
        finally:
            for r in reqs:
                if not r.finished:
                    self.engine.abort(r.request_id)
        return [self.output.result(r) for r in reqs]

    def _step(self) -> list[StepOutput]:
        try:
            return self.engine.step()
        except StepFailed as e:  # a blocking call fails whole, with what the model raised
            raise e.error from None

    def generate_stream(self, prompt: Prompt, params: SamplingParams | None = None,
                        lora_request: LoRARequest | None = None) -> Iterator[StreamDelta]:
        """Yield new text as it is generated. Closing the iterator (or Ctrl-C) aborts the request."""
        return self._stream(self.prepare(prompt, params, lora_request=lora_request))

    def _stream(self, req: RequestState) -> Iterator[StreamDelta]:
        self.engine.add_request(req.request_id, req.prompt_ids, req.params, req.mm, req.adapter)
        try:
            while not req.finished:
                for step in self._step():
                    if step.request_id == req.request_id:
                        yield from self.output.update(req, step, self.engine.finish)
        finally:
            if not req.finished:
                self.engine.abort(req.request_id)

    def chat(self, messages: Messages | list[Messages], params: SamplingParams | None = None, *,
             enable_thinking: bool | None = None, tools: list[dict] | None = None,
             lora_request: LoRARequest | list[LoRARequest | None] | None = None,
             **template_kwargs: Any) -> ChatOutput | list[ChatOutput]:
        """Answer one conversation (or a list of them); the reasoning comes back apart from the answer."""
        batch = bool(messages) and isinstance(messages[0], list)
        convs = cast(list[Messages], messages if batch else [messages])
        rendered = [self.render_chat(c, enable_thinking, tools, **template_kwargs) for c in convs]
        loras = _per_prompt(lora_request, len(convs))
        outs = self._run([self.prepare(ids, self.chat_params(params, thinking), mm, lr)
                          for (_, ids, thinking, mm), lr in zip(rendered, loras)])
        results = []
        for (prompt, ids, _, _), out in zip(rendered, outs):
            in_think = opens_think(prompt)
            comps = []
            for c in out.outputs:
                reasoning, content = split_reasoning(c.text, in_think)
                comps.append(ChatCompletion(c.index, content, reasoning, c.token_ids, c.finish_reason, c.text))
            results.append(ChatOutput(out.request_id, prompt, ids, comps))
        return results if batch else results[0]

    def chat_stream(self, messages: Messages, params: SamplingParams | None = None, *,
                    enable_thinking: bool | None = None, tools: list[dict] | None = None,
                    lora_request: LoRARequest | None = None, **template_kwargs: Any) -> Iterator[StreamDelta]:
        """Stream one conversation's answer; each delta says which part is reasoning and which content."""
        prompt, ids, thinking, mm = self.render_chat(messages, enable_thinking, tools, **template_kwargs)
        split = DeltaSplitter(prompt)
        for delta in self._stream(self.prepare(ids, self.chat_params(params, thinking), mm, lora_request)):
            yield split(delta)


def _per_prompt(lora: LoRARequest | list[LoRARequest | None] | None, n: int) -> list[LoRARequest | None]:
    if isinstance(lora, list):
        if len(lora) != n:
            raise ValueError(f"got {len(lora)} LoRARequests for {n} prompts")
        return lora
    return [lora] * n
