"""`python -m moesift.cli`: the `moesift` command."""

from . import main

main()
