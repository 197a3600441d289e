"""What every route shares: `ServerState` (the models, the server's defaults, stored Responses) and
`LeaseMiddleware`, which holds a request's models until its response has been sent."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fastapi import Request
from starlette.types import Receive, Scope, Send

from ..client import AdapterClient, EngineClient
from .errors import APIError
from .responses_store import ResponseStore

if TYPE_CHECKING:
    from .model_manager import ModelManager


@dataclass
class ServerState:
    models: "ModelManager"
    default_thinking: bool | None = None  # None: the chat template's own default
    created: int = field(default_factory=lambda: int(time.time()))
    max_queued: int | None = 256  # per model: requests beyond this many waiting in its engine get 429
    timeout: float | None = None  # seconds a request may run, from its arrival (--request-timeout)
    responses: ResponseStore = field(default_factory=ResponseStore)  # stored Responses API answers

    async def use(self, request: Request, name: str, keep_alive: Any = None) -> EngineClient:
        """The model `name` for this request, as the one interface routes call (client.py): loaded on
        first use, held until the response is sent."""
        start = time.perf_counter_ns()
        base = self.models.adapters.get(name)  # a LoRA adapter's name: its base model, the adapter per request
        entry = await self.models.acquire(base or name, keep_alive)
        waiting = entry.llm.stats().requests_waiting
        if self.max_queued is not None and waiting >= self.max_queued:
            self.models.release(entry)
            raise APIError(429, f"{waiting} requests are already waiting for {name}: retry shortly",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        request.scope["deltarun.leases"].append(entry)  # LeaseMiddleware releases it
        if self.timeout is not None:  # the model's load counts: the limit is on what the client waits
            request.scope["deltarun.deadline"] = (asyncio.get_running_loop().time() + self.timeout
                                                  - (time.perf_counter_ns() - start) / 1e9)
        request.scope["deltarun.load_ns"] = time.perf_counter_ns() - start  # Ollama's load_duration
        return entry.llm if base is None else cast(EngineClient, AdapterClient(entry.llm, name))

    def listed_loaded(self) -> list[Any]:
        """The loaded models to list (/api/tags, /v1/models): those whose files are still on disk. A folder
        deleted under a loaded model: it answers from memory until unloaded, but is offered no more."""
        return [e for e in self.models.entries() if e.llm is not None and Path(str(e.llm.path)).exists()]


def deadline(request: Request) -> float | None:
    """When this request's generation must end (the event loop's clock), None: no limit."""
    return request.scope.get("deltarun.deadline")


class LeaseMiddleware:
    """Releases the models a request used once its response is entirely sent (streams included)."""

    def __init__(self, app, manager: "ModelManager"):
        self.app, self.manager = app, manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        leases: list = []
        scope["deltarun.leases"] = leases
        try:
            await self.app(scope, receive, send)
        finally:  # synchronous: runs even when the request task is being cancelled
            for entry in leases:
                self.manager.release(entry)
