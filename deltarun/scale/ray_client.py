"""`RemoteClient`: the `EngineClient` (client.py) of a model whose engines are Ray Serve replicas.

The front end runs here, in the ingress, exactly as for a local model (it is `Frontend`'s code: chat
template, tokenizer, media preprocessing, `chat_params`, and the one request loop of request_stream.py with
its detokenizing, stop strings and observer); only the engine half crosses to a replica (ray_replica.py):
`RemoteSteps.generate` streams `StepOutput`s from the replica the router chose (routes.py), keyed by the
prompt's block hashes (affinity.py) so prefixes stay where they are cached.

A replica that dies mid-request ends that request at once with a 503 `APIError` (a 5xx body, or the error
event of a stream, in the route's API shape); requests not yet sent are routed by Serve to the live ones.
`replicas()` is what the ingress saw of each replica (`GET /ray/replicas`): requests routed, running,
failed, and its engine counters as of its last finished request (ray_replica.EngineReport).
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator
from dataclasses import astuple, dataclass, replace
from pathlib import Path
from typing import Any

from ..client import EngineStats, ModelInfo, RequestObserver
from ..inputs import MultiModalInput, StepOutput
from ..llm import Frontend
from ..outputs import StreamDelta
from ..processor.chat_template import ChatTemplate
from ..processor.mrope import VisionTokens
from ..processor.output import OutputProcessor, RequestState
from ..processor.tokenizer import Tokenizer
from ..processor.video import VideoProcessorConfig
from ..processor.vision import ImageProcessorConfig
from ..request_stream import stream_request
from ..sampling import SamplingParams
from ..server.errors import APIError
from .affinity import block_hashes
from .ray_replica import EngineDescription, EngineReport, ReplicaInfo

log = logging.getLogger("deltarun.scale")


@dataclass
class ReplicaRecord:
    """One replica as the ingress saw it."""

    info: ReplicaInfo
    routed: int = 0  # requests sent to it
    running: int = 0  # of those, still streaming
    failed: int = 0  # ended by an error on its side (it died, or the engine failed)
    stats: EngineStats | None = None  # as of its last finished request

    def as_json(self) -> dict[str, Any]:
        return {"replica": self.info.replica, "node": self.info.node, "pid": self.info.pid, "routed": self.routed,
                "running": self.running, "failed": self.failed,
                "prefix_cache_hits": self.stats.prefix_cache_hits if self.stats else None}


def _replica_error(e: BaseException) -> Exception:
    """A Ray failure while streaming → what the routes answer: 400 for bad input, 503 when a replica is gone."""
    from ray import exceptions as rx

    cause = e.cause if isinstance(e, rx.RayTaskError) else None
    if isinstance(cause, ValueError):
        return ValueError(str(cause))
    if isinstance(e, (rx.RayActorError, rx.ActorUnavailableError, rx.WorkerCrashedError, rx.NodeDiedError)):
        return APIError(503, "the replica running this request stopped; retry it (another replica will answer)",
                        code="replica_unavailable", headers={"Retry-After": "1"})
    try:
        from ray.serve.exceptions import BackPressureError
        if isinstance(e, BackPressureError):
            return APIError(429, "every replica is at its queue limit: retry shortly", code="rate_limit_exceeded",
                            headers={"Retry-After": "1"})
    except ImportError:
        pass
    return RuntimeError(f"the engine replica failed: {cause or e}")


class RemoteSteps:
    """The engine as request_stream.py sees it (`StepSource`), its steps coming from a replica."""

    def __init__(self, handle: Any, records: dict[str, ReplicaRecord]):
        self.handle = handle.options(stream=True)
        self.records = records
        self.where: dict[str, str] = {}  # running request id → replica id (for `finish`)
        self.streams: dict[str, Any] = {}  # running request id → its response generator (for `abort`)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       mm: MultiModalInput | None = None, adapter: str | None = None
                       ) -> AsyncGenerator[StepOutput, None]:
        gen = self.handle.generate.remote(request_id, prompt_ids, params, mm, adapter,
                                          blocks=block_hashes(prompt_ids))
        self.streams[request_id] = gen
        record: ReplicaRecord | None = None
        try:
            async for item in gen:
                if isinstance(item, ReplicaInfo):
                    record = self.records.setdefault(item.replica, ReplicaRecord(item))
                    record.routed += 1
                    record.running += 1
                    self.where[request_id] = item.replica
                    continue
                if item.finished:  # the replica's generator ends right after this: let it end rather than cancel
                    async for last in gen:  # it (measured: Serve kept a cancelled stream "ongoing" on its replica)
                        if isinstance(last, EngineReport) and record is not None:
                            record.stats = last.stats
                yield item
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except APIError:
            raise
        except Exception as e:
            if record is not None:
                record.failed += 1
            log.warning("deltarun: request %s failed on replica %s: %r", request_id,
                        record.info.replica if record else "?", e)
            raise _replica_error(e) from None
        finally:
            self.streams.pop(request_id, None)
            self.where.pop(request_id, None)
            if record is not None:
                record.running -= 1
            gen.cancel()  # a no-op once it has ended; otherwise the replica aborts the request

    def finish(self, request_id: str, index: int, reason: str, stop_reason: int | str | None = None) -> None:
        """A stop string ended one of several sequences (n > 1): its replica is not told (Serve offers no call to
        one given replica), so it runs on there until the request ends; its text is cut here all the same."""

    def abort(self, request_id: str) -> None:
        gen = self.streams.get(request_id)
        if gen is not None:
            gen.cancel()


class RemoteClient(Frontend):
    """`Frontend` without a local model (its __init__ is not run: the fields it sets come from the replica's
    `describe` and the model folder, which must be on the ingress's node too), engine calls to replicas."""

    def __init__(self, path: str | Path, handle: Any, desc: EngineDescription):
        self.path = Path(path)
        self.config = desc.config
        self.tokenizer = Tokenizer.from_folder(self.path)
        self._template = ChatTemplate.from_folder(self.path) or ChatTemplate.builtin(
            thinking_default=self.config.text.hidden_size >= 2560)
        self.output = OutputProcessor(self.tokenizer)
        self.default_max_tokens = desc.default_max_tokens
        self.default_adapter = None
        self.vision_tokens = VisionTokens.from_config(self.config)
        self.image_config = ImageProcessorConfig.from_folder(self.path)
        self.video_config = VideoProcessorConfig.from_folder(self.path)
        self.desc = desc
        self.records: dict[str, ReplicaRecord] = {}
        self.steps = RemoteSteps(handle, self.records)

    # -- front end: what `Frontend` does with its engine, checked against the replica's description ---
    def load_vision(self) -> None:
        if not self.config.vision:
            raise ValueError(f"{self.path.name} has no vision tower: it cannot read images or videos")

    def prepare(self, prompt: str | list[int], params: SamplingParams | None,  # type: ignore[override]
                mm: MultiModalInput | None = None, lora_request: Any = None) -> RequestState:
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        room = self.desc.max_model_len - len(ids)
        params = params.with_defaults({"max_tokens": max(0, min(self.default_max_tokens, room))})
        self._check(ids, params, mm)
        req = self.output.new_request(uuid.uuid4().hex, prompt if isinstance(prompt, str) else None, ids, params)
        req.mm = mm
        return req

    def _check(self, ids: list[int], params: SamplingParams, mm: MultiModalInput | None) -> None:
        """Engine.check_request's rules, so bad input is a 400 before anything is sent."""
        if mm is not None and mm.num_prompt != len(ids):
            raise ValueError(f"the multimodal positions cover {mm.num_prompt} tokens but the prompt has {len(ids)}")
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.config.text.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.desc.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, but the context length is "
                             f"{self.desc.max_model_len}; shorten it or raise the context length")
        if params.n > self.desc.num_slots:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.desc.num_slots}")
        params.validate()

    # -- engine half --------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.desc.max_model_len

    def stream(self, req: RequestState, observer: RequestObserver | None = None
               ) -> AsyncGenerator[list[StreamDelta], None]:
        return stream_request(self.steps, self.output, req, observer)

    def abort(self, request_id: str) -> None:
        self.steps.abort(request_id)

    def stats(self) -> EngineStats:
        """All replicas' counters added up (as of their last answers); `requests_waiting` is counted here:
        requests streaming beyond what the replicas decode at once (it decides the 429s)."""
        known = [r.stats for r in self.records.values() if r.stats is not None]
        total = EngineStats(0, 0, 0, 0, 0, 0, 0)
        for s in known:
            total = EngineStats(*(a + b for a, b in zip(astuple(total), astuple(s))))
        running = sum(r.running for r in self.records.values())
        slots = self.desc.num_slots * max(1, len(self.records))
        return replace(total, requests_waiting=max(0, running - slots))

    def model_info(self) -> ModelInfo:
        return self.desc.model_info

    def replicas(self) -> list[dict[str, Any]]:
        return [r.as_json() for r in sorted(self.records.values(), key=lambda r: r.info.replica)]

    def shutdown(self) -> None:
        for rid in list(self.steps.streams):
            self.steps.abort(rid)
