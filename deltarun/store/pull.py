"""Downloading a model into the Hugging Face cache, checked: one function for `deltarun pull` and `/api/pull`.

huggingface_hub's `snapshot_download` resumes a dropped connection inside a file (HTTP Range) and skips
files already in the cache, but it only checks each file's *size*. So after it returns, `verify` hashes
every blob of the snapshot against its name (the cache names blobs by ETag: sha256 for LFS files, the git
blob sha1 for small ones); a corrupt blob is removed and fetched again once, then reported.

A pull killed midway (kill -9, power cut) leaves a partial snapshot: whole files only (huggingface_hub
writes each blob as `.incomplete` and renames it), but not all of them. So the repo folder carries a
marker (records.PULL_MARKER) from the first byte until every file is verified; the store neither lists
nor loads a repo with the marker, and the next pull resumes and removes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from . import names
from .records import PULL_MARKER, hf_cache_dir, hf_repo_folder

SHA256 = re.compile(r"^[0-9a-f]{64}$")
SHA1 = re.compile(r"^[0-9a-f]{40}$")


class CorruptDownload(names.ModelNotFound):
    """A file still does not match its checksum after being fetched again."""


def resolve_repo(name: str) -> str:
    """The Hugging Face repo that `name` stands for, or ModelNotFound with a one-line reason."""
    base, quant = names.split_quant(name)
    repo = names.repo_for(name)
    if repo is None:
        if Path(name).expanduser().exists():
            raise names.ModelNotFound(f"{name} is a local path: nothing to pull, use it directly")
        if name == names.DEMO:
            raise names.ModelNotFound("'demo' is made locally, not downloaded: run `deltarun chat demo`")
        raise names.ModelNotFound(names.unknown_name_message(name))
    if quant and quant not in ("int4", "int8"):  # int4/int8 are made while loading, from the full model
        raise names.ModelNotFound(f"{name!r} names a GGUF file ({quant}); deltarun pulls safetensors from the "
                                f"Hugging Face hub: `deltarun pull {base}` (run it as {base}-int4 or -int8 "
                                f"to quantize while loading), or `ollama pull {name}` into Ollama's store")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        raise names.ModelNotFound(f"pulling {repo} needs the network, but HF_HUB_OFFLINE is set; "
                                f"unset it, or copy the cache folder models--{repo.replace('/', '--')} "
                                f"into {hf_cache_dir()}")
    return repo


def _digest_ok(blob: Path) -> bool:
    name = blob.name
    if SHA256.match(name):
        h = hashlib.sha256()
    elif SHA1.match(name):  # git blob id: sha1 of "blob <size>\0" + content
        h = hashlib.sha1(f"blob {blob.stat().st_size}\0".encode())
    else:
        return True  # not named by a digest (e.g. a quoted ETag a mirror made up): nothing to check
    with open(blob, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest() == name


def verify(snapshot: Path) -> list[Path]:
    """The snapshot's files whose blob does not hash to its name (removed, with their blob)."""
    bad = []
    for link in sorted(Path(snapshot).rglob("*")):
        if not link.is_symlink():
            continue
        blob = link.resolve()
        if blob.is_file() and not _digest_ok(blob):
            blob.unlink()
            link.unlink()
            bad.append(link)
    return bad


def pull(repo: str, revision: str | None = None, tqdm_class=None) -> Path:
    """Download `repo` (resuming, skipping what is cached), verify every file, re-fetch corrupt ones once."""
    from huggingface_hub import snapshot_download

    def fetch() -> Path:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=names.WEIGHT_PATTERNS,
                                      cache_dir=hf_cache_dir(), tqdm_class=tqdm_class))

    folder = hf_repo_folder(repo)
    marker = folder / PULL_MARKER
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"repo": repo, "revision": revision, "pid": os.getpid()}))  # its being there counts
    try:
        path = fetch()
        bad = verify(path)
        if bad:
            path = fetch()
            still = verify(path)
            if still:
                raise CorruptDownload(f"{', '.join(p.name for p in still)} of {repo} failed the checksum twice "
                                      "(removed); the server or a proxy is serving corrupt data")
    except BaseException:
        if all(p.name == PULL_MARKER for p in folder.iterdir()):  # nothing came (unknown repo, offline)
            shutil.rmtree(folder, ignore_errors=True)  # leave no folder behind
        raise  # else the marker stays: the snapshot is partial until a pull finishes it
    marker.unlink(missing_ok=True)  # every file is here and verified: the model may be listed now
    return path


def pull_error(repo: str, revision: str | None, e: Exception, endpoint: str) -> str:
    """A one-line message for a failed download."""
    from huggingface_hub import errors

    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, names.ModelNotFound):
        return str(e)
    if isinstance(e, errors.RevisionNotFoundError):
        return f"{repo} has no revision {revision!r} on {endpoint}"
    if isinstance(e, errors.GatedRepoError):
        return f"{repo} is gated: accept its license on {endpoint}/{repo} and log in (`hf auth login`)"
    if isinstance(e, errors.RepositoryNotFoundError):
        close = names.closest_names(repo)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"{repo} was not found on {endpoint}{hint}"
    if "no space left" in str(e).lower() or "not enough free disk space" in str(e).lower():
        return f"not enough disk space to download {repo}: {first}"
    return (f"could not download {repo} from {endpoint}: the network is unreachable or failed ({first}); "
            f"files already fetched are kept and the next `deltarun pull` resumes")
