"""`LoRARequest`: which adapter a request runs with, in the shape of vLLM's (no engine imports here)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter for a request, as vLLM's: `LoRARequest("sql", 1, "/path/to/adapter")`. The name selects it
    (and keys its prefix-cache entries); a name stays bound to the folder it was first given with. The id is
    kept for vLLM scripts' sake: deltarun tells adapters apart by name."""

    lora_name: str
    lora_int_id: int
    lora_path: str
