"""Model management commands: `deltarun list | show | pull | rm | ps` (logic in store/; `ps` asks a
running server). Names made with `/api/copy` are listed as copies, and `rm` of such a name removes only it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..store.progress import ProgressBars

if TYPE_CHECKING:
    from rich.progress import Progress

COMMANDS = ("list", "show", "pull", "rm", "ps")


def add_model_commands(sub) -> None:
    sub.add_parser("list", aliases=["ls"], help="Qwen3.5 models on this machine (HF cache, Ollama store, deltarun)")
    show = sub.add_parser("show", help="details of a local model: architecture, parameters, template, license")
    show.add_argument("model", help="a name from `deltarun list`, qwen3.5:0.8b, an org/repo id or a folder")
    pull = sub.add_parser("pull", help="download a model into the Hugging Face cache (resumable)")
    pull.add_argument("model", help="qwen3.5:0.8b|2b|4b|9b (+ -base) or an org/repo id")
    pull.add_argument("--revision", help="branch, tag or commit (default main)")
    rm = sub.add_parser("rm", help="delete a downloaded model (asks first)")
    rm.add_argument("model", help="a name from `deltarun list`")
    rm.add_argument("-y", "--yes", action="store_true", help="do not ask")
    rm.add_argument("--force", action="store_true", help="also delete another tool's files (Ollama's store, folders)")
    ps = sub.add_parser("ps", help="models loaded in a running `deltarun serve`, and their memory")
    ps.add_argument("--host", default="127.0.0.1")
    ps.add_argument("--port", type=int, default=11435)


def is_model_command(command: str) -> bool:
    return command in COMMANDS or command == "ls"


def run_model_command(args: argparse.Namespace) -> int:
    cmd = "list" if args.command == "ls" else args.command
    return {"list": cmd_list, "show": cmd_show, "pull": cmd_pull, "rm": cmd_rm, "ps": cmd_ps}[cmd](args)


def cmd_ps(args: argparse.Namespace) -> int:
    """GET /api/ps of a running server; one line when none answers."""
    import httpx

    from ..store import names
    from ..store.records import human_size

    url = f"http://{args.host}:{args.port}"
    try:
        r = httpx.get(url + "/api/ps", timeout=5)
        r.raise_for_status()
        models = r.json().get("models") or []
    except (httpx.HTTPError, ValueError) as e:
        raise names.ModelNotFound(f"no deltarun server answering at {url} ({type(e).__name__}); "
                                f"start one with `deltarun serve MODEL`") from None
    if not models:
        print(f"no models loaded in the server at {url}")
        return 0
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"):
        table.add_column(col, no_wrap=True)
    for m in models:
        size, vram = int(m.get("size") or 0), int(m.get("size_vram") or 0)
        proc = "100% GPU" if size and vram >= size else f"{vram * 100 // size}% GPU" if vram else "100% CPU"
        table.add_row(m.get("name", "?"), human_size(size), proc, str(m.get("context_length", "")),
                      _until(str(m.get("expires_at", ""))))
    _console().print(table)
    return 0


def _until(expires_at: str) -> str:
    """Ollama's UNTIL column: "4 minutes from now", "forever", "stopping..."."""
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    except ValueError:
        return expires_at
    if when.year >= 2900:
        return "forever"
    left = (when - datetime.now(timezone.utc)).total_seconds()
    if left <= 0:
        return "stopping..."
    for unit, size in (("hour", 3600), ("minute", 60), ("second", 1)):
        if left >= size or unit == "second":
            n = max(1, round(left / size))
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    return expires_at  # pragma: no cover


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False,
                   width=None if sys.stdout.isatty() else 160)


def cmd_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..store.listing import alias_models, list_models
    from ..store.ollama_store import ollama_dir
    from ..store.records import hf_cache_dir, human_size

    models = list_models()
    console = _console()
    if not models:
        console.print("no Qwen3.5 models found locally "
                      f"(looked in {hf_cache_dir()}, {ollama_dir()} and the deltarun folder); "
                      "try `deltarun pull qwen3.5:0.8b` or `deltarun chat demo`", soft_wrap=True)
        return 0
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "SIZE", "QUANT", "WHERE", "PATH"):
        table.add_column(col, no_wrap=col != "PATH", justify="right" if col == "SIZE" else "left")
    for m in models:
        where = m.where + (" (GGUF)" if m.is_gguf else "")
        table.add_row(m.name, human_size(m.size), m.quant, where, str(m.path))
    for m in alias_models():  # names made with /api/copy (`ollama cp`)
        table.add_row(m.name, human_size(m.size), m.quant, f"copy of {m.extra['alias_of']}", str(m.path))
    console.print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..store.info import describe
    from ..store.listing import find_local

    info = describe(find_local(args.model))
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for k, v in info.items():
        table.add_row(k, str(v))
    _console().print(table)
    return 0


class _RichBars(ProgressBars):
    """snapshot_download's progress bars, drawn with rich."""

    progress: Progress | None = None  # the shared rich.progress.Progress, set by cmd_pull

    def start(self) -> None:
        self.task = self.progress.add_task(self.desc, total=self.total or None, completed=self.n) \
            if self.progress is not None else None

    def report(self) -> None:
        task = getattr(self, "task", None)
        if task is not None:
            assert self.progress is not None  # a task exists only on a progress
            self.progress.update(task, description=self.desc, completed=self.n, total=self.total or None)

    @staticmethod
    def write(s, *args, **kwargs):
        print(s, file=sys.stderr)


def cmd_pull(args: argparse.Namespace) -> int:
    from huggingface_hub import constants
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from ..store import names
    from ..store.pull import pull, pull_error, resolve_repo
    from ..store.records import hf_cache_dir, human_size

    repo = resolve_repo(args.model)
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its retry warnings would break the one-line error; it retries anyway
    err = _console(stderr=True)
    print(f"pulling {repo}{f' @ {args.revision}' if args.revision else ''} into {hf_cache_dir()}", flush=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=err, transient=True)
    _RichBars.progress = progress
    try:
        with progress:
            path = pull(repo, args.revision, tqdm_class=_RichBars)
    except Exception as e:  # huggingface_hub / httpx raise many types
        raise names.ModelNotFound(pull_error(repo, args.revision, e, constants.ENDPOINT)) from None
    finally:
        _RichBars.progress = None
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    print(f"pulled {repo} ({human_size(size)}, checksums verified) to {path}")
    alias = names.alias_for(repo)
    print(f"run it: deltarun chat {alias or repo}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from ..store import names
    from ..store.aliases import aliases, forget_aliases_of, remove_alias
    from ..store.listing import find_local
    from ..store.operations import delete, deletion_refusal
    from ..store.records import human_size

    table = aliases()
    copied = next((n for n in (args.model, f"{args.model}:latest") if n in table), None)
    if copied:  # a name made with /api/copy: only the name goes, as `ollama rm` does
        remove_alias(copied)
        print(f"deleted the name {copied} ({table[copied]} stays)")
        return 0
    model = find_local(args.model)
    refusal = deletion_refusal(model)
    if refusal and not args.force:
        raise names.ModelNotFound(f"not deleting: {refusal}")
    if not args.yes:
        prompt = f"delete {model.name} ({human_size(model.size)}, {model.where}: {model.path})? [y/N] "
        try:
            answer = input(prompt)
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted", file=sys.stderr)
            return 1
    freed = delete(model)
    gone = forget_aliases_of(model)
    print(f"deleted {model.name} ({human_size(freed)} freed)"
          + (f"; also the names {', '.join(gone)}" if gone else ""))
    return 0
