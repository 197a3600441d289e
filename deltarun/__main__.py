"""`python -m deltarun`: the command line."""
from .cli.process import run

run()
