"""The interactive `deltarun chat` loop: streaming answers, reasoning shown dimmed, slash commands.

Multi-line input: end a line with `\\` to continue it, or wrap a block in triple quotes.
Ctrl-C stops the current answer (the conversation keeps what was said); Ctrl-D or /exit leaves.
`/image PATH` and `/video PATH` attach media to the next message; it stays in the conversation, so
later turns still see it (a prefix-cache hit past the media skips encoding it again).
"""
from __future__ import annotations

import argparse
import sys

from rich.console import Console

from .options import load_llm, media_part, sampling_params

HELP = """commands:
  /think on|off    thinking (reasoning before the answer) on or off
  /system TEXT     set the system prompt (empty: remove it); clears the conversation
  /image PATH      attach an image to your next message (repeatable)
  /video PATH      attach a video to your next message (repeatable)
  /clear           forget the conversation (and pending attachments)
  /exit, /bye      leave (or Ctrl-D)
  \"\"\"             start or end a multi-line message; a line ending in \\ continues"""


def read_message(console: Console) -> str | None:
    """One user message (None at end of input)."""
    try:
        first = input(">>> ")
    except EOFError:
        return None
    if first.strip().startswith('"""'):
        lines = [first.strip()[3:]]
        while not lines[-1].rstrip().endswith('"""'):
            try:
                lines.append(input("... "))
            except EOFError:
                break
        lines[-1] = lines[-1].rstrip().removesuffix('"""')
        return "\n".join(lines).strip("\n")
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(input("... "))
        except EOFError:
            break
    return "\n".join(lines)


def run_chat(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    console = Console(highlight=False)
    params = sampling_params(args)
    with console.status(f"loading {args.model} …"):
        llm = load_llm(args)
    think = llm.template.thinking_default if args.think is None else args.think
    system = args.system
    history: list[dict] = []
    attached: list[dict] = []  # media parts waiting for the next message
    console.print(f"[bold]{llm.path.name}[/] ready · thinking {'on' if think else 'off'} · /help for commands",
                  style="dim")
    while True:
        msg = read_message(console)
        if msg is None:
            console.print()
            return 0
        text = msg.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            cmd, _, rest = text.partition(" ")
            if cmd in ("/exit", "/bye", "/quit"):
                return 0
            if cmd == "/help":
                console.print(HELP, style="dim")
            elif cmd == "/clear":
                history.clear()
                attached.clear()
                console.print("conversation cleared", style="dim")
            elif cmd in ("/image", "/video"):
                kind, path = cmd[1:], rest.strip().strip("'\"")
                try:
                    attached.append(media_part(kind, path))
                except ValueError as e:
                    console.print(f"error: {e}", style="red", markup=False)
                    continue
                console.print(f"attached {kind} {path} (sent with your next message)", style="dim", markup=False)
            elif cmd == "/system":
                system, history = (rest.strip() or None), []
                console.print(f"system prompt {'set' if system else 'removed'}; conversation cleared", style="dim")
            elif cmd == "/think" and rest.strip() in ("on", "off"):
                think = rest.strip() == "on"
                console.print(f"thinking {rest.strip()}", style="dim")
            else:
                console.print(f"unknown command {text!r}; /help lists them", style="red")
            continue
        content = attached + [{"type": "text", "text": msg}] if attached else msg
        attached = []
        history.append({"role": "user", "content": content})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        reasoning, content = _answer(console, llm, messages, params, think)
        if reasoning is None:  # the request failed before producing anything (attachments are dropped too)
            history.pop()
            continue
        history.append({"role": "assistant", "content": content, "reasoning_content": reasoning})


def _answer(console: Console, llm, messages, params, think: bool) -> tuple[str | None, str]:
    reasoning, content = "", ""
    in_reasoning = False
    stream = llm.chat_stream(messages, params, enable_thinking=think)
    try:
        for d in stream:
            if d.reasoning:
                if not in_reasoning:
                    console.print("thinking: ", style="dim italic", end="")
                    in_reasoning = True
                console.print(d.reasoning, style="dim", end="", markup=False)
                reasoning += d.reasoning
            if d.content:
                if in_reasoning:
                    console.print("\n")
                    in_reasoning = False
                console.print(d.content, end="", markup=False)
                content += d.content
        console.print()
    except KeyboardInterrupt:
        stream.close()  # aborts the request; the program goes on
        console.print("\n[stopped]", style="yellow")
    except ValueError as e:  # e.g. the conversation outgrew the context
        console.print(f"error: {e}", style="red", markup=False)
        return None, ""
    sys.stdout.flush()
    return reasoning, content
