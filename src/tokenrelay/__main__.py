"""``python -m tokenrelay``: the same as the ``tokenrelay`` command."""

from tokenrelay.cli import main

main()
