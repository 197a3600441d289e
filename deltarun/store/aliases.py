"""The table of names made with `/api/copy` (`ollama cp`): new name → the name or path it stands for, kept
as aliases.json in deltarun's folder. Reading and writing the table only. Not here: checking that a
copy's source exists (operations.add_alias), resolving a name through the table (listing.find_local),
the built-in short names like qwen3.5:0.8b (names.py)."""
from __future__ import annotations

import json

from .. import atomic
from ..paths import cache_dir
from . import names
from .records import LocalModel, read_json

ALIASES_FILE = "aliases.json"


def aliases() -> dict[str, str]:
    """Names made with `/api/copy` (new name → the name or path it stands for), in deltarun's folder."""
    data = read_json(cache_dir() / ALIASES_FILE) or {}
    return {str(k): str(v) for k, v in data.items()}


def write_aliases(table: dict[str, str]) -> None:
    """Replace the whole table atomically (a temp file of its own, renamed over it: a crash mid-write leaves
    the old table, and two writers never share a temp name)."""
    atomic.write_text(cache_dir() / ALIASES_FILE, json.dumps(table, indent=2, sort_keys=True))


def forget_aliases_of(model: LocalModel) -> list[str]:
    """Remove the copied names that point at `model` (after deleting it); returns them."""
    table = aliases()
    targets = {t for t in (model.name, model.repo_id, str(model.path)) if t}
    gone = [k for k, v in table.items() if v in targets or names.split_quant(v)[0] in targets]
    if gone:
        write_aliases({k: v for k, v in table.items() if k not in gone})
    return gone


def remove_alias(name: str) -> bool:
    table = aliases()
    if name not in table:
        return False
    del table[name]
    write_aliases(table)
    return True
