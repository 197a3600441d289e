"""Writing files and folders so that a crash (kill -9, power cut, full disk) never leaves a half-written one
under its final name: write beside it under a temp name, then rename into place (one atomic rename on the
same filesystem). Temp names start with "." (store listings skip hidden names) and carry the writer's pid,
so a later writer can tell a dead writer's leftovers (`sweep`) from a live one's work in progress.
Used by the store (aliases, the demo checkpoint) and weights/ (quantized folders, GGUF sidecars).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path

_TEMP = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")


def temp_path(final: Path) -> Path:
    """A fresh hidden name beside `final` (same folder, so the final rename never crosses filesystems)."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp(name: str) -> bool:
    """Whether `name` is a temp name made by `temp_path` (never a model, never listed)."""
    return _TEMP.match(name) is not None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def sweep(folder: Path, name: str | None = None) -> list[Path]:
    """Remove the temp files/folders in `folder` (only those for final name `name`, if given) whose writer
    is gone (killed mid-write); returns them. A live writer's temp is left alone: it may be minutes into a
    quantization."""
    gone: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return gone
    for p in entries:
        m = _TEMP.match(p.name)
        if m is None or (name is not None and not p.name.startswith(f".{name}.tmp-")) or _alive(int(m.group(1))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            gone.append(p)
        except OSError:  # another process swept it first, or no permission: it stays hidden either way
            pass
    return gone


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported here (Windows): the rename is still atomic for a crash of the process
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path.parent, path.name)  # a killed writer's temp of this file
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them (power cuts)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def publish_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`, replacing what is there. An old `final` is first renamed
    aside (atomic) and only then deleted, so a crash at any point leaves `final` whole (old or new) or
    absent, never half-deleted."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists() or final.is_symlink():
        old = temp_path(final)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
