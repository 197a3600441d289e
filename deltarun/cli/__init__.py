"""Command line (`deltarun …`, `python -m deltarun`): main.py parses and dispatches; options.py holds the
flags and helpers every command shares; chat.py is the REPL, models.py the local-model commands (list, show,
pull, rm, ps), tools.py quantize and bench. Thin: flags → the Python API."""
from .main import build_parser, main
from .options import engine_options

__all__ = ["build_parser", "engine_options", "main"]
