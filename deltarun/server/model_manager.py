"""Several models in one server, as Ollama holds them: loaded on first request, kept for `keep_alive`,
unloaded when idle or when another model needs the room.

`ModelManager` lives on the event loop (all its state is touched from there only, so it needs no locks);
loading and unloading run in worker threads. Concurrent requests for a model that is loading share one
load. A request holds its model (`in_flight`) until its response is fully sent (app.LeaseMiddleware),
so an unload never cuts a request. Names go through `targets.resolve_target` (the resolver every
command uses).
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..store import names
from .errors import APIError
from .targets import (
    FOREVER,
    Target,
    free_memory_for,
    gb,
    load_llm,
    parse_keep_alive,
    resolve_target,
    unload_llm,
    weight_bytes,
)

_UNSET = object()
log = logging.getLogger("deltarun.server")
_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[/\\][^/\\\s'\"():,]+)+[/\\]?")


def path_free(text: str) -> str:
    """`text` with every filesystem path cut to its last part: a client learns the reason, not the layout
    of the server's disk (the full text goes to the server log)."""
    return _PATH.sub(lambda m: m.group(0).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or "/", text)


@dataclass(eq=False)
class Loaded:
    """A model in memory and what the scheduler needs to know about it."""

    key: str
    name: str                    # the name it was first asked by (what /api/ps shows)
    names: set[str]
    llm: Any                     # an EngineClient: AsyncLLM today (None once unloaded)
    size: int                    # bytes of weights in memory
    default_keep_alive: float | None  # for requests that give none (FOREVER for the command-line model)
    keep_alive: float | None
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    expires: float | None = None  # monotonic deadline once idle; None = never

    def expires_at(self) -> str:
        """ISO time of the unload (Ollama's `expires_at`); a busy model counts from now."""
        if self.keep_alive is FOREVER:
            return "2999-01-01T00:00:00Z"
        left = self.keep_alive if self.in_flight else max(0.0, (self.expires or 0.0) - time.monotonic())
        when = datetime.fromtimestamp(time.time() + left, timezone.utc)
        return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ModelManager:
    store_managed = True  # whether pull/delete/copy may change the store under it (False under `serve --ray`)

    def __init__(self, engine_options: dict[str, Any] | None = None, *, keep_alive: float | None = 300.0,
                 max_loaded: int = 3, room_timeout: float = 30.0,
                 factory: Callable[[Target, dict[str, Any]], Any] = load_llm,
                 on_load: Callable[[Any], None] | None = None,
                 free_memory: Callable[[], int] | None = None):
        """engine_options: `AsyncLLM` keywords for every model (dtype, device, max_memory, ...).
        room_timeout: how long a load waits for busy models to finish before answering 503."""
        if max_loaded < 1:
            raise ValueError("--max-loaded-models must be >= 1")
        self.engine_options = dict(engine_options or {})
        self.keep_alive, self.max_loaded, self.room_timeout = keep_alive, max_loaded, room_timeout
        self.factory, self.on_load = factory, on_load
        self.free_memory = free_memory or (lambda: free_memory_for(self.engine_options.get("device", "auto")))
        self.loaded: dict[str, Loaded] = {}
        self.loads = self.unloads = 0
        self._loading: dict[str, asyncio.Future] = {}
        self._wanted: Counter[str] = Counter()  # requests waiting for a model: it must not be unloaded
        self._load_lock: asyncio.Lock | None = None
        self._changed: asyncio.Event | None = None  # a model was released or unloaded
        self._reaper: asyncio.Task | None = None
        self._named: dict[str, tuple[Target, float | None]] = {}  # adopted models: (target, keep_alive)
        self.adapters: dict[str, str] = {}  # LoRA adapter name → its base model's name (`serve --lora-modules`)

    # ------------------------------------------------------------------------------------ set-up
    def adopt(self, llm: Any, name: str, *, names: tuple[str, ...] = (), key: str | None = None,
              keep_alive: float | None = FOREVER) -> Loaded:
        """Register an already loaded model (the one named on the command line)."""
        key = key or f"{Path(str(llm.path)).resolve()}|"
        entry = Loaded(key, name, {name, *names, Path(str(llm.path)).name}, llm, weight_bytes(llm),
                       keep_alive, keep_alive)
        entry.expires = None if keep_alive is FOREVER else time.monotonic() + keep_alive
        self.loaded[key] = entry
        # its names (a --served-model-name, a folder) must still load it after an unload
        target = Target(key, name, Path(str(llm.path)), key.rpartition("|")[2] or None, entry.size)
        self._named.update({n: (target, keep_alive) for n in entry.names})
        return entry

    def start(self) -> None:
        """Start the expiry task (on the running loop); called at app start-up and on first use."""
        if self._load_lock is None:
            self._load_lock, self._changed = asyncio.Lock(), asyncio.Event()
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="deltarun-keep-alive")

    async def close(self) -> None:  # the app's shutdown: every model unloaded
        if self._reaper is not None:
            self._reaper.cancel()
        for entry in list(self.loaded.values()):
            await self._unload(entry)

    # ---------------------------------------------------------------------------------- look-ups
    def find(self, name: str) -> Loaded | None:
        """The loaded model `name` was already used for (no disk access)."""
        for n in (name, name.removesuffix(":latest")):
            for entry in self.loaded.values():
                if n in entry.names:
                    return entry
        return None

    def served(self) -> dict[str, Any]:
        """The command-line model's name → its folder (listed even while it is unloaded)."""
        return {t.name: t.path for t, _ in self._named.values()}

    def forget_name(self, name: str) -> None:
        """`name` may stand for another model now (a copy made or deleted): resolve it afresh next time."""
        for entry in self.loaded.values():
            entry.names.discard(name)
            entry.names.discard(name.removesuffix(":latest"))

    async def resolve(self, name: str) -> Target:
        named = self._named.get(name) or self._named.get(name.removesuffix(":latest"))
        if named is not None:
            return named[0]
        try:
            return await asyncio.to_thread(resolve_target, name, self.engine_options)
        except names.ModelNotFound as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from None

    def entries(self) -> list[Loaded]:
        return sorted(self.loaded.values(), key=lambda e: -e.last_used)

    # ------------------------------------------------------------------------------ acquire/release
    async def acquire(self, name: str, keep_alive: Any = _UNSET) -> Loaded:
        """The model `name`, loaded if needed, marked in use until `release`."""
        self.start()
        unset = keep_alive is _UNSET or keep_alive is None
        seconds = None if unset else _parse(keep_alive)
        entry = self.find(name)
        if entry is None:
            target = await self.resolve(name)
            self._wanted[target.key] += 1
            try:
                entry = await self._get(target)
            finally:
                self._wanted[target.key] -= 1
                if not self._wanted[target.key]:
                    del self._wanted[target.key]
            entry.names.add(name)
        # nothing awaits from here on: the model cannot be unloaded before it is marked busy
        entry.in_flight += 1
        entry.keep_alive = entry.default_keep_alive if unset else seconds
        entry.last_used, entry.expires = time.monotonic(), None
        return entry

    def release(self, entry: Loaded) -> None:
        """The request is over (its response sent): start the keep-alive clock, or unload now for 0."""
        entry.in_flight -= 1
        entry.last_used = time.monotonic()
        if entry.in_flight == 0 and entry.keep_alive is not FOREVER:
            entry.expires = entry.last_used + entry.keep_alive
        self._signal()

    async def unload_name(self, name: str) -> None:
        """`keep_alive: 0` without a prompt: unload `name` now, or as soon as its requests end."""
        entry = self.find(name)
        if entry is None:
            target = await self.resolve(name)  # 404 for unknown names, as Ollama
            entry = self.loaded.get(target.key)
        if entry is None:
            return
        entry.keep_alive = 0.0
        if entry.in_flight == 0 and not self._wanted.get(entry.key):
            await self._unload(entry)
        else:
            entry.expires = time.monotonic()

    async def unload_path(self, path) -> None:
        """Unload every idle model loaded from inside `path` (before deleting it); 409 when one is busy."""
        from ..store.records import is_inside

        for entry in list(self.loaded.values()):
            served = entry.llm.path
            if is_inside(served, path) or is_inside(path, served):
                if entry.in_flight or self._wanted.get(entry.key):
                    raise APIError(409, f"{entry.name} is answering requests; delete it once they end")
                await self._unload(entry)

    # ------------------------------------------------------------------------------------ loading
    async def _get(self, target: Target) -> Loaded:
        entry = self.loaded.get(target.key)
        if entry is not None:
            return entry
        task = self._loading.get(target.key)
        if task is None:
            task = asyncio.ensure_future(self._load(target))
            self._loading[target.key] = task

            def done(t: asyncio.Future, key: str = target.key) -> None:
                self._loading.pop(key, None)
                if not t.cancelled():
                    t.exception()  # retrieved here: nobody may be left waiting for a failed load
            task.add_done_callback(done)
        # shield: a client that goes away does not stop a load others may be waiting for
        return await asyncio.shield(task)

    async def _load(self, target: Target) -> Loaded:
        assert self._load_lock is not None
        async with self._load_lock:  # one load at a time: the memory check sees the previous one
            await self._make_room(target)
            try:
                llm = await asyncio.to_thread(self.factory, target, self.engine_options)
            except Exception as e:  # LoadError, ConfigError, OSError, ...: the server keeps serving others
                log.error("could not load model %r from %s", target.name, target.path, exc_info=e)
                raise APIError(500, f"could not load model {target.name!r}: {path_free(str(e))}") from None
            if self.on_load is not None:
                self.on_load(llm)
            self.loads += 1
            keep = next((k for t, k in self._named.values() if t.key == target.key), self.keep_alive)
            entry = Loaded(target.key, target.name, {target.name}, llm, weight_bytes(llm), keep, keep)
            self.loaded[target.key] = entry
            return entry

    async def _make_room(self, target: Target) -> None:
        """Unload idle models, least recently used first, until `target` fits in count and memory."""
        deadline = time.monotonic() + self.room_timeout
        while True:
            assert self._changed is not None
            self._changed.clear()
            full = len(self.loaded) >= self.max_loaded
            free = self.free_memory()
            short = target.estimate > free
            if not full and not short:
                return
            idle = [e for e in self.loaded.values() if not e.in_flight and not self._wanted.get(e.key)]
            if idle:
                await self._unload(min(idle, key=lambda e: e.last_used))
                continue
            if short and not self.loaded:
                raise APIError(503, f"not enough memory to load {target.name!r}: it needs about "
                               f"{gb(target.estimate)} and {gb(free)} is free", code="insufficient_memory")
            left = deadline - time.monotonic()
            if left <= 0:
                why = (f"--max-loaded-models is {self.max_loaded}" if full else
                       f"it needs about {gb(target.estimate)} and {gb(free)} is free")
                busy = ", ".join(sorted(repr(e.name) for e in self.loaded.values()))
                raise APIError(503, f"cannot load {target.name!r} now: {why}, and the loaded models ({busy}) "
                               "are all answering requests; retry later", code="model_busy")
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass

    async def _unload(self, entry: Loaded) -> None:
        if self.loaded.get(entry.key) is not entry:
            return
        del self.loaded[entry.key]
        self.unloads += 1
        box, entry.llm = [entry.llm], None
        try:
            await asyncio.to_thread(unload_llm, box)
        except Exception as e:  # the model is out of the table either way; keep serving the others
            log.warning("deltarun: unloading %s failed: %s", entry.name, e)
        self._signal()

    def _signal(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _reap(self) -> None:
        """Unload idle models whose keep-alive has run out; sleeps until the next deadline or a change."""
        assert self._changed is not None
        while True:
            now = time.monotonic()
            for e in list(self.loaded.values()):
                if (not e.in_flight and not self._wanted.get(e.key) and e.expires is not None
                        and e.expires <= now):
                    await self._unload(e)
            deadlines = [e.expires for e in self.loaded.values()
                         if not e.in_flight and not self._wanted.get(e.key) and e.expires is not None]
            self._changed.clear()
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass


def _parse(value: Any) -> float | None:
    try:
        return parse_keep_alive(value)
    except ValueError as e:
        raise APIError(400, str(e), param="keep_alive") from None


def is_unload(value: Any) -> bool:
    """Whether a request's keep_alive is 0 (with no prompt: Ollama's way to unload a model)."""
    return value is not None and _parse(value) == 0
