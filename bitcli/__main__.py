"""`python -m bitcli` runs the same app as the `bit` console script."""

from bitcli.cli import main

main()
