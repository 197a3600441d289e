"""`python -m deltarun.cli`."""
from .exit import run

run()
