"""``python -m cornerstone``: the command line (:mod:`cornerstone.cli`)."""

from .cli import main

main()
