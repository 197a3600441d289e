"""Where deltarun keeps its own files: `~/.cache/deltarun`, or $DELTARUN_HOME (demo checkpoint, GGUF
sidecars, quantized copies, aliases, kernel builds)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("DELTARUN_HOME", Path.home() / ".cache" / "deltarun"))
