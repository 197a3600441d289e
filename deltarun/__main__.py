"""`python -m deltarun`: the command line."""
from .cli.exit import run

run()
