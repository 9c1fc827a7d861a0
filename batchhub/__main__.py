"""`python -m batchhub` is the `batchhub` command."""

from batchhub.cli import main

main()
