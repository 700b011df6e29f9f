"""`python -m convert ...` is the same as `convert-dataset ...`."""

from .cli import main

main(prog_name="convert-dataset")
