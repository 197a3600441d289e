"""`python -m deltarun.cli`."""
from .process import run

run()
