"""`RemoteModels`: the server's `ModelManager` (server/model_manager.py) for `serve --ray`: one model, served
by a deployment of replicas, never loaded or unloaded here.

Under `--ray` the models are placed on the nodes beforehand (docs/scale-out.md): any other name is a 404,
and pull, delete and copy answer 400 (`store_managed = False`, checked by server/manage.py), since they
would change only the ingress node's disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..server.errors import APIError
from ..server.model_manager import Loaded, ModelManager
from ..server.targets import FOREVER, Target


class RemoteModels(ModelManager):
    store_managed = False

    def __init__(self, client: Any, name: str, aliases: tuple[str, ...] = ()):
        super().__init__({}, keep_alive=FOREVER, max_loaded=1)
        self.client = client
        key = f"{Path(str(client.path)).resolve()}|"
        entry = Loaded(key, name, {name, *aliases, Path(str(client.path)).name}, client,
                       client.model_info().parameters * 2, FOREVER, FOREVER)
        self.loaded[key] = entry
        target = Target(key, name, Path(str(client.path)), None, entry.size)
        self._named.update({n: (target, FOREVER) for n in entry.names})

    async def resolve(self, name: str) -> Target:
        named = self._named.get(name) or self._named.get(name.removesuffix(":latest"))
        if named is None:
            served = ", ".join(sorted(n for n in self._named))
            raise APIError(404, f"model {name!r} is not served here: this --ray server serves {served}",
                           param="model", code="model_not_found")
        return named[0]

    async def unload_name(self, name: str) -> None:
        await self.resolve(name)  # keep_alive 0 is accepted, but the replicas stay: Serve owns them

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        self.client.shutdown()
