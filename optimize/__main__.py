"""`python -m optimize` is the `optimize` command."""

from optimize.cli.commands import main

main()
